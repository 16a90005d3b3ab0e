"""Schemathesis against the running node: no 5xx, and every response matches the document."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from node_helpers import Node

pytest.importorskip("schemathesis")
pytestmark = pytest.mark.timeout(240)

# Conformance of what the node answers. The checks that judge input validation from the
# schema alone (negative_data_rejection, positive_data_acceptance, ...) are left out: they
# cannot see that a body must parse as the type its X-Hypercacheio-Type header names.
CHECKS = ",".join([
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "unsupported_method",
])


def test_node_conforms_to_its_openapi_document(tmp_path: Path) -> None:
    with Node(str(tmp_path / "st")) as node:
        result = subprocess.run(
            [sys.executable, "-c", "from schemathesis.cli import schemathesis; schemathesis()",
             "run", f"{node.url}/openapi.json",
             "--header", f"X-Hypercacheio-Token: {node.token}",
             "--checks", CHECKS,
             "--phases", "examples,coverage,fuzzing",
             "--max-examples", "40",
             "--seed", "20240601",
             "--generation-database", "none",
             "--workers", "1",
             "--no-color"],
            capture_output=True, text=True, timeout=200, cwd=str(tmp_path),
            stdin=subprocess.DEVNULL)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-6000:]
        assert "12 generated" not in output  # sanity: it did generate cases
        node.stop()
        assert "Traceback" not in node.log() and '"level": "error"' not in node.log()
