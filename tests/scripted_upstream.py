"""A scripted SMTP upstream on raw sockets (campus mail as a test double that records what
arrived in each read, and answers as a real MTA may: replies together or apart, PIPELINING,
CHUNKING), for the relay's wire-level tests."""

from __future__ import annotations

import socket
import threading
import time


class ScriptedUpstream:
    """An SMTP server on loopback that offers PIPELINING and records every read of each
    connection. ``together``: the replies to the commands of one read go in one write;
    else one write each, 50 ms apart. ``close_on_pair``: connection numbers (from 1) that
    close, unanswered, when MAIL and RCPT arrive. ``chunking`` offers CHUNKING (RFC 3030)
    and takes BDAT; ``chunk_reply`` answers a last chunk instead of 250 (the message is then
    not kept); ``close_on_chunk``: connection numbers that close, unanswered, once a chunk
    has arrived whole."""

    def __init__(self, together: bool = True, chunking: bool = False) -> None:
        self.together = together
        self.chunking = chunking
        self.chunk_reply: bytes | None = None
        self.close_on_chunk: set[int] = set()
        self.close_on_pair: set[int] = set()
        self.reads: list[list[bytes]] = []  # per connection, every read after EHLO
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"smtp://127.0.0.1:{self.port}"
        self._threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.reads.append([])
            t = threading.Thread(target=self._serve, args=(conn, len(self.reads)), daemon=True)
            t.start()
            self._threads.append(t)

    def _send(self, conn: socket.socket, replies: list[bytes]) -> None:
        if self.together:
            conn.sendall(b"".join(replies))
            return
        for i, reply in enumerate(replies):
            if i:
                time.sleep(0.05)
            conn.sendall(reply)

    def _serve(self, conn: socket.socket, number: int) -> None:
        reads = self.reads[number - 1]
        conn.settimeout(30)
        buf = b""
        try:
            conn.sendall(b"220 up.test ESMTP\r\n")
            while b"\r\n" not in buf:
                buf += conn.recv(65536)
            buf = buf.partition(b"\r\n")[2]
            conn.sendall(b"250-up.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                         + (b"250-CHUNKING\r\n" if self.chunking else b"")
                         + b"250 SIZE 10000000\r\n")
            mail_from, rcpts, chunks = "", [], []
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                reads.append(chunk)
                buf += chunk
                if number in self.close_on_pair and b"MAIL" in buf and b"RCPT" in buf:
                    return  # (finally: closed, nothing answered)
                replies = []
                while b"\r\n" in buf:
                    line, _, buf = buf.partition(b"\r\n")
                    verb = line[:4].upper()
                    if verb == b"MAIL":
                        mail_from, rcpts, chunks = line[11:].split(b">")[0].decode(), [], []
                        replies.append(b"250 2.1.0 OK\r\n")
                    elif verb == b"RCPT":
                        rcpts.append(line[9:].split(b">")[0].decode())
                        replies.append(b"250 2.1.5 OK\r\n")
                    elif verb == b"DATA":
                        self._send(conn, [*replies, b"354 go ahead\r\n"])
                        replies = []
                        while b"\r\n.\r\n" not in b"\r\n" + buf:
                            more = conn.recv(65536)
                            if not more:
                                return
                            buf += more
                        body, _, buf = (b"\r\n" + buf).partition(b"\r\n.\r\n")
                        self.messages.append((mail_from, rcpts, body[2:] + b"\r\n"))
                        replies.append(b"250 2.0.0 Ok: queued as UP%d\r\n" % len(self.messages))
                    elif verb == b"BDAT" and self.chunking:
                        size, _, last = line[5:].partition(b" ")
                        while len(buf) < int(size):
                            more = conn.recv(65536)
                            if not more:
                                return
                            buf += more
                        chunks.append(buf[:int(size)])
                        buf = buf[int(size):]
                        if number in self.close_on_chunk:
                            return
                        if last.upper() != b"LAST":
                            replies.append(b"250 2.0.0 %d octets received\r\n" % int(size))
                        elif self.chunk_reply is not None:
                            replies.append(self.chunk_reply)
                        else:
                            self.messages.append((mail_from, rcpts, b"".join(chunks)))
                            replies.append(b"250 2.0.0 Ok: queued as UP%d\r\n"
                                           % len(self.messages))
                        chunks = []
                    elif verb == b"RSET":
                        replies.append(b"250 2.0.0 OK\r\n")
                    elif verb == b"QUIT":
                        self._send(conn, [*replies, b"221 bye\r\n"])
                        return
                    else:
                        replies.append(b"502 5.5.2 what\r\n")
                if replies:
                    self._send(conn, replies)
        except OSError:
            return
        finally:
            conn.close()

    def stop(self) -> None:
        self.sock.close()
