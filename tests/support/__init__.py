"""Helpers the tests import (never conftest.py): real processes and their runs, certificates, a live leader
in the test process, and small networks for the arithmetic; one module per job."""
