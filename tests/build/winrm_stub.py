"""A WinRM endpoint just real enough for Packer's WinRM communicator to connect (Basic auth over
HTTP, one canned WS-Management answer that every request accepts), so Packer goes on to run
its Ansible provisioner the way it does against the build VM."""
from __future__ import annotations

import base64
import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

# masterzen/winrm (Packer's client) reads each value it needs by XPath, so one envelope carries
# the shell id, a command id, its output and the "Done" state with exit code 0.
_ANSWER = """<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope"
 xmlns:w="http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd"
 xmlns:rsp="http://schemas.microsoft.com/wbem/wsman/1/windows/shell">
<s:Header><w:SelectorSet><w:Selector Name="ShellId">stub-shell</w:Selector></w:SelectorSet></s:Header>
<s:Body>
<rsp:CommandResponse><rsp:CommandId>stub-command</rsp:CommandId></rsp:CommandResponse>
<rsp:ReceiveResponse>
<rsp:Stream Name="stdout" CommandId="stub-command">{stdout}</rsp:Stream>
<rsp:CommandState CommandId="stub-command"
 State="http://schemas.microsoft.com/wbem/wsman/1/windows/shell/CommandState/Done"><rsp:ExitCode>0</rsp:ExitCode></rsp:CommandState>
</rsp:ReceiveResponse>
</s:Body></s:Envelope>""".format(stdout=base64.b64encode(b"WinRM connected.\r\n").decode()).encode()


@dataclass
class WinrmStub:
    port: int
    requests: int = 0
    refused: int = 0


@contextmanager
def winrm_stub(user: str, password: str) -> Iterator[WinrmStub]:
    expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    stub = WinrmStub(port=0)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.headers.get("Authorization") != expected:
                stub.refused += 1
                self.send_response(401)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            stub.requests += 1
            self.send_response(200)
            self.send_header("Content-Type", "application/soap+xml;charset=UTF-8")
            self.send_header("Content-Length", str(len(_ANSWER)))
            self.end_headers()
            self.wfile.write(_ANSWER)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    stub.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield stub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
