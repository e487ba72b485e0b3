"""CheckpointPolicy documents: parsing, validation and target selection. Pure.

A policy file holds one or more YAML documents::

    apiVersion: backupd.io/v1
    kind: CheckpointPolicy
    metadata: {name: web}
    spec:
      selector: {namespaces: [default], matchLabels: {app: nginx}, containers: [nginx]}
      schedule: "*/15 * * * *"
      backend: local
      retention: {keepLast: 3, keepDaily: 7}

Validation errors name the file, the document, the field path and the bad value. A file is
parsed and validated whole before anything is applied: one bad document applies nothing.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from typing import Any, Final, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic.alias_generators import to_camel

from backupd.errors import PolicyError, validation_problems
from backupd.model import DNS_LABEL, GROUP_BY_REPLICA, Container, Pod
from backupd.policy import retention
from backupd.policy.schedule import Schedule
from backupd.sizes import parse_size

API_VERSION: Final = "backupd.io/v1"
KIND: Final = "CheckpointPolicy"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True)


class Selector(_Strict):
    namespaces: list[str] | None = None
    match_labels: dict[str, str] = Field(default_factory=dict)
    containers: list[str] | None = None

    def matches_pod(self, pod: Pod) -> bool:
        if self.namespaces is not None and pod.namespace not in self.namespaces:
            return False
        return all(pod.labels.get(k) == v for k, v in self.match_labels.items())

    def matches_container(self, container: Container) -> bool:
        if self.containers is None:
            return True
        return any(fnmatch.fnmatchcase(container.name, pattern) for pattern in self.containers)


class Retention(_Strict):
    keep_last: int | None = None
    keep_hourly: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_monthly: int | None = None
    keep_yearly: int | None = None
    keep_within: str | None = None
    keep_within_hourly: str | None = None
    keep_within_daily: str | None = None
    keep_within_weekly: str | None = None
    keep_within_monthly: str | None = None
    keep_within_yearly: str | None = None
    max_total_bytes: int | str | None = None

    @field_validator("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly")
    @classmethod
    def _count(cls, v: int | None) -> int | None:
        if v is not None and v < -1:
            raise ValueError(f"must be a count >= 0, or -1 for unlimited; got {v}")
        return v

    @field_validator(
        "keep_within", "keep_within_hourly", "keep_within_daily",
        "keep_within_weekly", "keep_within_monthly", "keep_within_yearly",
    )
    @classmethod
    def _duration(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                retention.Duration.parse(v)
            except PolicyError as exc:
                raise ValueError(str(exc)) from None
        return v

    @field_validator("max_total_bytes", mode="before")
    @classmethod
    def _size(cls, v: object) -> object:
        if v is None:
            return v
        if isinstance(v, bool) or not isinstance(v, int | str):
            raise ValueError(f"must be a size such as 50Gi; got {v!r}")
        if parse_size(v) <= 0:
            raise ValueError(f"must be a positive size such as 50Gi; got {v!r}")
        return v

    @model_validator(mode="after")
    def _not_empty(self) -> Retention:
        if self.rules().is_empty():
            raise ValueError(
                "no keep rule: set at least one of keepLast, keepHourly, keepDaily, keepWeekly, "
                "keepMonthly, keepYearly or keepWithin* (a policy that keeps nothing is refused)"
            )
        return self

    def rules(self) -> retention.Rules:
        def dur(v: str | None) -> retention.Duration | None:
            return retention.Duration.parse(v) if v is not None else None

        return retention.Rules(
            last=self.keep_last or 0,
            hourly=self.keep_hourly or 0,
            daily=self.keep_daily or 0,
            weekly=self.keep_weekly or 0,
            monthly=self.keep_monthly or 0,
            yearly=self.keep_yearly or 0,
            within=dur(self.keep_within),
            within_hourly=dur(self.keep_within_hourly),
            within_daily=dur(self.keep_within_daily),
            within_weekly=dur(self.keep_within_weekly),
            within_monthly=dur(self.keep_within_monthly),
            within_yearly=dur(self.keep_within_yearly),
            max_total_bytes=parse_size(self.max_total_bytes) if self.max_total_bytes is not None else None,
        )


class VerifySpec(_Strict):
    schedule: str
    sample: int = Field(default=3, ge=1)

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, v: str) -> str:
        Schedule.parse(v)
        return v


class PolicySpec(_Strict):
    selector: Selector = Field(default_factory=Selector)
    schedule: str
    backend: str
    retention: Retention
    timezone: str = "UTC"
    keep_on_node: int = Field(default=0, ge=0)
    verify: VerifySpec | None = None
    #: what retention groups a workload's archives by besides its container: ``replica`` (the
    #: pod's stable identity, see :func:`backupd.model.replica_of`) or ``pod`` (every pod name)
    group_by: Literal["replica", "pod"] = GROUP_BY_REPLICA

    @model_serializer(mode="wrap")
    def _omit_default_group_by(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # The default is left out, so policies stored before groupBy existed keep their
        # canonical JSON and `policy apply` of them stays "unchanged".
        data: dict[str, Any] = handler(self)
        if self.group_by == GROUP_BY_REPLICA:
            data.pop("groupBy", None)
            data.pop("group_by", None)
        return data

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r} (use an IANA name such as UTC or Europe/Paris)") from None
        return v

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, v: str) -> str:
        Schedule.parse(v)  # cron syntax does not depend on the zone
        return v


class Metadata(_Strict):
    name: str

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not DNS_LABEL.match(v):
            raise ValueError(f"must be a DNS label (lower-case letters, digits, '-', at most 63); got {v!r}")
        return v


class PolicyDocument(_Strict):
    api_version: Literal["backupd.io/v1"]
    kind: Literal["CheckpointPolicy"]
    metadata: Metadata
    spec: PolicySpec


@dataclass(frozen=True)
class Policy:
    """A validated policy, as the daemon uses it."""

    name: str
    spec: PolicySpec

    @property
    def schedule(self) -> Schedule:
        return Schedule.parse(self.spec.schedule, self.spec.timezone)

    @property
    def rules(self) -> retention.Rules:
        return self.spec.retention.rules()

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.spec.timezone)

    def to_document(self) -> dict[str, Any]:
        """The policy as a :class:`PolicyDocument`'s JSON (rules left unset are left out)."""
        document = PolicyDocument(api_version=API_VERSION, kind=KIND, metadata=Metadata(name=self.name), spec=self.spec)
        return document.model_dump(by_alias=True, exclude_none=True, mode="json")

    def canonical_json(self) -> str:
        """Stable serialisation: equal policies give equal strings (idempotent apply)."""
        return json.dumps(self.to_document()["spec"], sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_spec_json(cls, name: str, spec_json: str) -> Policy:
        """A policy as stored in the catalog, validated as ``policy apply`` validates it.

        Raises :class:`PolicyError` naming the policy and the field when the stored spec is not
        valid for this backupd (stored by an older version, e.g. with a schedule that never
        fires): callers skip that policy and say so, never crash on it.
        """
        where = f"stored policy {name!r}"
        try:
            return cls(name, PolicySpec.model_validate(json.loads(spec_json)))
        except ValidationError as exc:
            raise PolicyError("\n".join(validation_problems(exc.errors(), where, prefix="spec"))) from None
        except ValueError as exc:
            raise PolicyError(f"{where}: spec: not valid JSON ({exc})") from None

    def targets(self, pods: list[Pod]) -> list[tuple[Pod, Container]]:
        """The running containers this policy selects, in a stable order."""
        selected = []
        for pod in sorted(pods, key=lambda p: (p.namespace, p.name)):
            if not self.spec.selector.matches_pod(pod):
                continue
            for c in pod.containers:
                if c.running and self.spec.selector.matches_container(c):
                    selected.append((pod, c))
        return selected


class RefusedPolicy(BaseModel):
    """A stored policy this backupd refuses (:meth:`Policy.from_spec_json`), so does not schedule."""

    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True)

    api_version: Literal["backupd.io/v1"]
    kind: Literal["CheckpointPolicy"]
    metadata: Metadata
    spec: Any = Field(description="The spec as stored (null when it is not JSON)")
    error: str = Field(description="Why it is not scheduled, e.g. a schedule that never fires")


def stored_document(name: str, spec_json: str) -> dict[str, Any]:
    """A stored policy's document, for listing every policy whatever its state: as applied
    (:class:`PolicyDocument`), or, when this backupd refuses it, a :class:`RefusedPolicy`."""
    try:
        return Policy.from_spec_json(name, spec_json).to_document()
    except PolicyError as exc:
        try:
            spec = json.loads(spec_json)
        except ValueError:
            spec = None
        # not validated: a row stored by an older backupd is listed whatever it holds
        refused = RefusedPolicy.model_construct(api_version=API_VERSION, kind=KIND,
                                                metadata=Metadata.model_construct(name=name), spec=spec, error=str(exc))
        return refused.model_dump(by_alias=True)


def parse_policies(text: str, source: str = "<input>", backends: list[str] | None = None) -> list[Policy]:
    """Parse and validate every document of a policy file; all or nothing.

    ``backends``, when given, is the list of configured backend names each policy must use.
    Raises :class:`PolicyError` listing every problem found.
    """
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyError(f"{source}: not valid YAML{at}: {problem}") from None
    except (ValueError, TypeError, AttributeError, RecursionError, OverflowError) as exc:
        # PyYAML's scalar constructors raise these for values such as 2001-13-01 or !!int x
        message = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise PolicyError(f"{source}: not valid YAML: {message}") from None
    if not documents:
        raise PolicyError(f"{source}: no policy documents found")
    problems: list[str] = []
    policies: list[Policy] = []
    seen: dict[str, int] = {}
    for index, doc in enumerate(documents, start=1):
        metadata = doc.get("metadata") if isinstance(doc, dict) else None
        name = metadata.get("name") if isinstance(metadata, dict) else None
        where = f"{source}: document {index}" + (f" ({name!r})" if isinstance(name, str) else "")
        if not isinstance(doc, dict):
            problems.append(f"{where}: expected a mapping, got {type(doc).__name__}")
            continue
        try:
            parsed = PolicyDocument.model_validate(doc)
        except ValidationError as exc:
            problems.extend(validation_problems(exc.errors(), where))
            continue
        p = Policy(parsed.metadata.name, parsed.spec)
        if p.name in seen:
            problems.append(f"{where}: metadata.name: {p.name!r} is already defined by document {seen[p.name]}")
            continue
        seen[p.name] = index
        if backends is not None and p.spec.backend not in backends:
            known = ", ".join(backends) or "none configured"
            problems.append(f"{where}: spec.backend: unknown backend {p.spec.backend!r} (configured: {known})")
            continue
        policies.append(p)
    if problems:
        raise PolicyError("\n".join(problems))
    return policies
