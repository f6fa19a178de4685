"""A server that listens beyond loopback says the port it really got (launch.py's demo binds loopback; the rest of
launch.py is tested with processes, in tests/e2e/test_launch.py)."""

import logging

from federated.net import rpc


def test_a_server_on_every_interface_warns_with_the_port_it_got(caplog):
    with caplog.at_level(logging.WARNING, logger="rpc"):
        server, port = rpc.start_server("0.0.0.0:0", [], [], 1 << 20)
    server.stop(0)
    [warning] = [record.getMessage() for record in caplog.records if "listening on" in record.getMessage()]
    assert f"listening on 0.0.0.0:{port} without a token" in warning
