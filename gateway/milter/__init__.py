"""The milter front: Postfix's smtpd asks the gateway at each stage of its own SMTP sessions
(the Sendmail milter protocol, version 6) and enforces the engine's answers."""
