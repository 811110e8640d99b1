"""The syntax of mail that every layer shares (fronts, engine, checks): the canonical header
block, mailbox and path parsing, SMTP replies with enhanced status codes, and ARC sealing."""
