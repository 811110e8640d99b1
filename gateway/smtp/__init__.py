"""The SMTP front: aiosmtpd server, session hooks, address parsing and reply formatting."""
