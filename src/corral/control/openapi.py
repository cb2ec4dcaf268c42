"""The API's OpenAPI document: `python -m corral.control.openapi > docs/openapi.json` (a test keeps the
committed copy in step with the code)."""

from __future__ import annotations

import json

from corral.control.api import create_api


def document() -> dict:
    # The routes only describe themselves here; nothing is called.
    return create_api(plane=None, keys=None).openapi()  # type: ignore[arg-type]


def main() -> None:
    print(json.dumps(document(), indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
