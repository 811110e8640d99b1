"""Message-level parsing shared by every front (SMTP, milter): the canonical header block."""
