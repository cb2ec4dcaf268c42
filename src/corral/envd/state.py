"""What the host tells envd about its sandbox through POST /init."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field


@dataclass
class SandboxState:
    access_token: str | None = None
    env_vars: dict[str, str] = field(default_factory=dict)
    # envd's own fallback is root, as in E2B; templates set "user" through /init.
    default_user: str = "root"
    default_workdir: str | None = None

    def token_matches(self, presented: str | None) -> bool:
        if self.access_token is None:
            return True
        return presented is not None and hmac.compare_digest(presented.encode(), self.access_token.encode())
