"""Offline by design (issue 14): nothing in the package attempts a network connection.

Each check runs in a fresh interpreter whose environment has no Hugging Face settings (the test
session's conftest sets them, which would hide the bug) and whose sockets refuse to connect.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

GUARD = textwrap.dedent(
    """
    import json, socket, sys
    attempts = []

    def _refuse(*args, **kwargs):
        attempts.append(repr(args)[:200])
        raise OSError("network access attempted (blocked by the test)")

    socket.socket.connect = _refuse
    socket.socket.connect_ex = _refuse
    socket.getaddrinfo = _refuse
    socket.create_connection = _refuse

    def _report(**extra):
        print("RESULT " + json.dumps({"attempts": attempts, **extra}))
    """
)


def _run(body: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    proc = subprocess.run([sys.executable, "-c", GUARD + textwrap.dedent(body)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_default_checkpoint_and_text_encoding_make_no_connection() -> None:
    out = _run(
        """
        import os
        import napari_ctvlp
        env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        import torch
        from napari_ctvlp.engine.pipeline import load_model
        loaded = load_model()
        with torch.no_grad():
            emb = loaded.model.encode_text(["small left pleural effusion"])
        _report(env=env, shape=list(emb.shape))
        """
    )
    assert out["env"] == {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    assert out["shape"][0] == 1
    assert out["attempts"] == []


def test_uncached_hub_text_encoder_fails_without_a_connection() -> None:
    """A Hugging Face name that is not in the cache: transformers looked up the network (user-agent registry)."""
    out = _run(
        """
        from napari_ctvlp.engine.networks.text_encoder import TextEncoder
        try:
            TextEncoder("microsoft/BiomedVLP-CXR-BERT-specialized-not-cached")
            error = None
        except ValueError as exc:
            error = str(exc)
        _report(error=error)
        """
    )
    assert out["error"] and "without downloading" in out["error"]
    assert out["attempts"] == []


def test_an_explicit_user_setting_is_kept() -> None:
    out = _run(
        """
        import os
        os.environ["HF_HUB_OFFLINE"] = "0"
        import napari_ctvlp
        _report(value=os.environ["HF_HUB_OFFLINE"], telemetry=os.environ.get("HF_HUB_DISABLE_TELEMETRY"))
        """
    )
    assert out["value"] == "0" and out["telemetry"] == "1"
