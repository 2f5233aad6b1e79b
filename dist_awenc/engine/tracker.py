"""The JSON-lines metrics tracker (an Accelerate tracker); printing is :mod:`dist_awenc.log`."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from accelerate.tracking import GeneralTracker


class JSONLinesTracker(GeneralTracker):
    """Appends one JSON object per ``accelerator.log`` call: ``{"step", "time", **values}``."""

    name = "jsonl"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)

    @property
    def tracker(self) -> Path:
        return self.path

    def store_init_configuration(self, values: dict) -> None:
        pass  # the resolved config is saved as config.yaml beside the metrics

    def log(self, values: dict[str, Any], step: Optional[int] = None, **kwargs: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "time": round(time.time(), 3), **values}) + "\n")
