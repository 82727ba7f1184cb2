"""Which downstream datasets the pipelines fan out over (few-shot, de-duplication, fine-tuning).

Kedro builds pipelines before it reads parameters, so the list lives in `conf/base/globals.yml`
(`downstream_datasets`), read here from the project's `conf/` folder. Each name needs catalog entries
`downstream.<name>.train` and `downstream.<name>.test`.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from vit_pipelines.data.embedded import DOWNSTREAM_NAMES


def downstream_datasets(conf_source: str | Path = "conf") -> list[str]:
    """`downstream_datasets` from `<conf_source>/base/globals.yml`; the embedded sets outside a project."""
    path = Path(conf_source) / "base" / "globals.yml"
    if not path.exists():
        return list(DOWNSTREAM_NAMES)
    names = (yaml.safe_load(path.read_text()) or {}).get("downstream_datasets")
    if not names or not all(isinstance(n, str) and n.isidentifier() for n in names):
        raise ValueError(
            f"{path}: downstream_datasets must be a non-empty list of identifiers, got {names!r}"
        )
    return list(names)
