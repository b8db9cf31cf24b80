"""The run config `fedcare run` submits: the coordinator's options over its `--run-config` pairs, checked here
before anything is sent, with an absolute output directory, and kept beside the results for `--resume`.

The output directory travels as an absolute path because the ServerApp writes there from wherever
the SuperLink was started; the file `OUTPUT_DIR/run-config.toml` is what `flwr run --run-config`
reads, and what `fedcare run --resume` starts from, so a resumed run asks for the same settings.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w

from fedcare.errors import FedcareError
from fedcare.run_config import RunSettings

RUN_CONFIG_FILE = "run-config.toml"
# `KEY=VALUE` pairs as `flwr run --run-config` reads them: TOML values, quoted strings may hold spaces
_PAIR = re.compile(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)")


def parse_pairs(texts: list[str]) -> dict[str, Any]:
    """``["k1=v1 k2='text'", ...]`` -> {key: TOML value}; later pairs win. A FedcareError names a bad pair."""
    values: dict[str, Any] = {}
    for text in texts:
        pairs = _PAIR.findall(text)
        if not pairs and text.strip():
            raise FedcareError(
                f"--run-config '{text}' holds no KEY=VALUE pair",
                "write e.g. --run-config \"strategy='fedadam' target-epsilon=1.0\"",
            )
        for key, value in pairs:
            try:
                values[key] = tomllib.loads(f"v = {value}")["v"]
            except tomllib.TOMLDecodeError:
                raise FedcareError(
                    f"--run-config {key}={value}: not a TOML value",
                    "quote text ('fedadam'); numbers and true/false go bare",
                ) from None
    return values


def saved_run_config(output_dir: Path) -> dict[str, Any]:
    """The run config `fedcare run` submitted for the run in ``output_dir`` (empty when there is none)."""
    path = output_dir / RUN_CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise FedcareError(
            f"{path} is not a TOML run config ({exc})",
            "restore it, or resume with the run's settings given again as options",
        ) from None


def coordinator_run_config(
    output_dir: Path, hospitals: int, resume: bool, pairs: Mapping[str, Any], options: Mapping[str, Any]
) -> dict[str, Any]:
    """The whole run config: on --resume the saved one, then ``pairs``, then ``options`` (None: not given),
    then ``hospitals`` unless given, the absolute ``output_dir`` and ``resume``; checked as RunSettings."""
    config = {k: v for k, v in saved_run_config(output_dir).items() if k != "resume"} if resume else {}
    config |= dict(pairs)
    config |= {k: v for k, v in options.items() if v is not None}
    config.setdefault("hospitals", hospitals)
    config |= {"output-dir": str(output_dir), "resume": resume}
    RunSettings.from_config(config)  # unknown keys, wrong types, impossible values: refused here
    return config


def write_run_config(output_dir: Path, config: Mapping[str, Any]) -> Path:
    """Write ``config`` as ``output_dir/run-config.toml`` (the file `flwr run --run-config` reads)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / RUN_CONFIG_FILE
    path.write_text(tomli_w.dumps(dict(config)))
    return path
