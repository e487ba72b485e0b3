"""Policies the tests apply: one builder instead of a YAML literal per test module."""

from __future__ import annotations

from typing import Any

from backupd.policy.document import Policy, parse_policies


def web_policy(*, backend: str = "local", retention: str = "{keepLast: 3}", keep_on_node: int = 0,
               name: str = "web", schedule: str = "@every 1h", extra: str = "") -> str:
    """The nginx containers of the default namespace's web Deployment, hourly unless told."""
    return (
        f"apiVersion: backupd.io/v1\nkind: CheckpointPolicy\nmetadata: {{name: {name}}}\nspec:\n"
        "  selector: {namespaces: [default], matchLabels: {app: web}, containers: [nginx]}\n"
        f'  schedule: "{schedule}"\n  backend: {backend}\n  retention: {retention}\n'
        f"  keepOnNode: {keep_on_node}\n{extra}"
    )


def apply(app: Any, text: str) -> Policy:
    """Parse one policy document against the app's backends and store it in its catalog."""
    (policy,) = parse_policies(text, "test.yaml", backends=[b.name for b in app.config.backends])
    app.catalog.apply_policies([(policy.name, policy.canonical_json())])
    return policy
