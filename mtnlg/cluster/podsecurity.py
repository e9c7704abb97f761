"""What every pod mtnlg creates wears, and which Pod Security level a pod needs.

Kubernetes' Pod Security admission enforces one of three levels per namespace (the label
``pod-security.kubernetes.io/enforce``): ``privileged`` (anything), ``baseline`` (no known
privilege escalation) and ``restricted`` (hardened). mtnlg's pods (the TrainJob or PyTorchJob
nodes, the InferenceService predictor) meet ``restricted`` unless an option needs more::

    pod_security_context(1000)       # runAsNonRoot, runAsUser 1000 (the images' user), seccomp RuntimeDefault
    container_security_context()     # allowPrivilegeEscalation false, capabilities drop ALL
    container_security_context(add=["IPC_LOCK"])   # RDMA memory registration: needs "privileged"
    pod_security_level(pod_spec)     # ("restricted" | "baseline" | "privileged", [Violation, ...])

The rules are the Pod Security Standards page's (kubernetes.io/docs/concepts/security/
pod-security-standards, Kubernetes 1.32-1.34), control by control, over ``containers``,
``initContainers`` and ``ephemeralContainers``:

baseline (a pod breaking one needs ``privileged``)
  HostProcess: ``windowsOptions.hostProcess`` unset or false. Host namespaces:
  ``hostNetwork``, ``hostPID``, ``hostIPC`` unset or false. Privileged containers:
  ``privileged`` unset or false. Capabilities: ``add`` only from the container runtime's
  default set (AUDIT_WRITE, CHOWN, DAC_OVERRIDE, FOWNER, FSETID, KILL, MKNOD,
  NET_BIND_SERVICE, SETFCAP, SETGID, SETPCAP, SETUID, SYS_CHROOT). HostPath volumes: none.
  Host ports: ``hostPort`` unset or 0. AppArmor: profile type unset, RuntimeDefault or
  Localhost, and the ``container.apparmor.security.beta.kubernetes.io/*`` annotations
  ``runtime/default`` or ``localhost/*``. SELinux: type unset, ``container_t``,
  ``container_init_t``, ``container_kvm_t`` or ``container_engine_t``; user and role unset.
  /proc mount: ``procMount`` unset or Default. Seccomp: not Unconfined. Sysctls: only the
  safe ones (``SAFE_SYSCTLS``). Host probes and lifecycle hooks (1.34): no ``host`` in
  ``httpGet`` / ``tcpSocket``.
restricted (a pod breaking one needs ``baseline``)
  Volume types: only configMap, csi, downwardAPI, emptyDir, ephemeral,
  persistentVolumeClaim, projected, secret. Privilege escalation:
  ``allowPrivilegeEscalation`` false on every container. Running as non-root:
  ``runAsNonRoot`` true on the pod or on every container, false nowhere. Non-root user:
  ``runAsUser`` never 0. Seccomp: RuntimeDefault or Localhost on the pod or on every
  container. Capabilities: every container drops ALL and adds only NET_BIND_SERVICE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LEVELS = ("restricted", "baseline", "privileged")
IMAGE_USER = 1000  # the user mtnlg's images (and KServe's huggingfaceserver image) run as
ENFORCE_LABEL = "pod-security.kubernetes.io/enforce"
BASELINE_CAPABILITIES = frozenset({"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                                   "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"})
SAFE_SYSCTLS = frozenset({"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range",
                          "net.ipv4.ip_unprivileged_port_start", "net.ipv4.tcp_syncookies",
                          "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                          "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout",
                          "net.ipv4.tcp_keepalive_intvl", "net.ipv4.tcp_keepalive_probes"})
SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"})
RESTRICTED_VOLUMES = frozenset({"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                                "projected", "secret"})
CONTAINER_LISTS = ("containers", "initContainers", "ephemeralContainers")


def pod_security_context(run_as_user: int = IMAGE_USER) -> dict[str, Any]:
    """The pod-level half of the restricted standard: non-root, as the images' user, with
    the container runtime's default seccomp profile."""
    return {"runAsNonRoot": True, "runAsUser": run_as_user, "seccompProfile": {"type": "RuntimeDefault"}}


def container_security_context(add: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The container-level half: no privilege escalation, every capability dropped but
    ``add`` (anything beyond NET_BIND_SERVICE leaves the restricted level)."""
    caps: dict[str, Any] = {"drop": ["ALL"]}
    if add:
        caps["add"] = sorted(set(add))
    return {"allowPrivilegeEscalation": False, "privileged": False, "runAsNonRoot": True, "capabilities": caps}


@dataclass(frozen=True)
class Violation:
    """One rule a pod breaks: ``level`` is the lowest level that forbids it ("baseline":
    the pod needs privileged; "restricted": it needs baseline)."""

    level: str
    control: str
    field: str
    value: Any
    allowed: str

    def __str__(self) -> str:
        return f"{self.field}={self.value!r} ({self.control}: {self.allowed})"


def _containers(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(f"spec.{key}[{i}]", c) for key in CONTAINER_LISTS for i, c in enumerate(spec.get(key) or [])]


def _baseline(meta: dict[str, Any], spec: dict[str, Any]) -> list[Violation]:
    out: list[Violation] = []

    def bad(control, field, value, allowed):
        out.append(Violation("baseline", control, field, value, allowed))

    psc = spec.get("securityContext") or {}
    contexts = [("spec.securityContext", psc)] + [(f"{w}.securityContext", c.get("securityContext") or {})
                                                  for w, c in _containers(spec)]
    for where, sc in contexts:
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            bad("HostProcess", f"{where}.windowsOptions.hostProcess", True, "unset or false")
        kind = (sc.get("appArmorProfile") or {}).get("type")
        if kind not in (None, "RuntimeDefault", "Localhost"):
            bad("AppArmor", f"{where}.appArmorProfile.type", kind, "unset, RuntimeDefault or Localhost")
        se = sc.get("seLinuxOptions") or {}
        if se.get("type") not in (None, *SELINUX_TYPES):
            bad("SELinux", f"{where}.seLinuxOptions.type", se["type"],
                "unset or " + ", ".join(sorted(SELINUX_TYPES - {""})))
        for key in ("user", "role"):
            if se.get(key):
                bad("SELinux", f"{where}.seLinuxOptions.{key}", se[key], "unset")
        seccomp = (sc.get("seccompProfile") or {}).get("type")
        if seccomp == "Unconfined":
            bad("Seccomp", f"{where}.seccompProfile.type", seccomp, "unset, RuntimeDefault or Localhost")
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            bad("Host Namespaces", f"spec.{key}", True, "unset or false")
    for where, c in _containers(spec):
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            bad("Privileged Containers", f"{where}.securityContext.privileged", True, "unset or false")
        extra = sorted(set((sc.get("capabilities") or {}).get("add") or []) - BASELINE_CAPABILITIES)
        if extra:
            bad("Capabilities", f"{where}.securityContext.capabilities.add", extra,
                "only the runtime's default set: " + ", ".join(sorted(BASELINE_CAPABILITIES)))
        if sc.get("procMount") not in (None, "Default"):
            bad("/proc Mount Type", f"{where}.securityContext.procMount", sc["procMount"], "unset or Default")
        for j, port in enumerate(c.get("ports") or []):
            if port.get("hostPort"):
                bad("Host Ports", f"{where}.ports[{j}].hostPort", port["hostPort"], "unset or 0")
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            for handler in ("httpGet", "tcpSocket"):
                host = ((c.get(probe) or {}).get(handler) or {}).get("host")
                if host:
                    bad("Host Probes / Lifecycle Hooks", f"{where}.{probe}.{handler}.host", host, "unset or empty")
        for hook in ("postStart", "preStop"):
            for handler in ("httpGet", "tcpSocket"):
                host = (((c.get("lifecycle") or {}).get(hook) or {}).get(handler) or {}).get("host")
                if host:
                    bad("Host Probes / Lifecycle Hooks", f"{where}.lifecycle.{hook}.{handler}.host", host,
                        "unset or empty")
    for i, v in enumerate(spec.get("volumes") or []):
        if "hostPath" in v:
            bad("HostPath Volumes", f"spec.volumes[{i}].hostPath", v["hostPath"], "unset")
    for key, value in (meta.get("annotations") or {}).items():
        if key.startswith("container.apparmor.security.beta.kubernetes.io/") and not (
                value == "runtime/default" or str(value).startswith("localhost/")):
            bad("AppArmor", f"metadata.annotations[{key}]", value, "runtime/default or localhost/*")
    for i, s in enumerate(psc.get("sysctls") or []):
        if s.get("name") not in SAFE_SYSCTLS:
            bad("Sysctls", f"spec.securityContext.sysctls[{i}].name", s.get("name"),
                "only " + ", ".join(sorted(SAFE_SYSCTLS)))
    return out


def _restricted(spec: dict[str, Any]) -> list[Violation]:
    out: list[Violation] = []

    def bad(control, field, value, allowed):
        out.append(Violation("restricted", control, field, value, allowed))

    for i, v in enumerate(spec.get("volumes") or []):
        kinds = sorted(set(v) - {"name"})
        if not kinds or not set(kinds) <= RESTRICTED_VOLUMES:
            bad("Volume Types", f"spec.volumes[{i}]", kinds, "only " + ", ".join(sorted(RESTRICTED_VOLUMES)))
    psc = spec.get("securityContext") or {}
    containers = _containers(spec)
    if psc.get("runAsNonRoot") is False:
        bad("Running as Non-root", "spec.securityContext.runAsNonRoot", False, "true")
    if psc.get("runAsUser") == 0:
        bad("Running as Non-root user", "spec.securityContext.runAsUser", 0, "unset or non-zero")
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    if pod_seccomp not in (None, "RuntimeDefault", "Localhost"):
        bad("Seccomp", "spec.securityContext.seccompProfile.type", pod_seccomp, "RuntimeDefault or Localhost")
    for where, c in containers:
        sc = c.get("securityContext") or {}
        if sc.get("allowPrivilegeEscalation") is not False:
            bad("Privilege Escalation", f"{where}.securityContext.allowPrivilegeEscalation",
                sc.get("allowPrivilegeEscalation"), "false")
        non_root = sc.get("runAsNonRoot")
        if non_root is False or (non_root is None and psc.get("runAsNonRoot") is not True):
            bad("Running as Non-root", f"{where}.securityContext.runAsNonRoot", non_root,
                "true (here or in spec.securityContext)")
        if sc.get("runAsUser") == 0:
            bad("Running as Non-root user", f"{where}.securityContext.runAsUser", 0, "unset or non-zero")
        seccomp = (sc.get("seccompProfile") or {}).get("type")
        if seccomp not in (None, "RuntimeDefault", "Localhost") or (seccomp is None and pod_seccomp is None):
            bad("Seccomp", f"{where}.securityContext.seccompProfile.type", seccomp,
                "RuntimeDefault or Localhost (here or in spec.securityContext)")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            bad("Capabilities", f"{where}.securityContext.capabilities.drop", caps.get("drop"), "must include ALL")
        extra = sorted(set(caps.get("add") or []) - {"NET_BIND_SERVICE"})
        if extra:
            bad("Capabilities", f"{where}.securityContext.capabilities.add", extra, "only NET_BIND_SERVICE")
    return out


def pod_security_violations(pod_spec: dict[str, Any], metadata: dict[str, Any] | None = None) -> list[Violation]:
    """Every Pod Security Standards rule the pod (its ``spec``, and its ``metadata`` for the
    AppArmor annotations) breaks, baseline's first."""
    return _baseline(metadata or {}, pod_spec) + _restricted(pod_spec)


def pod_security_level(pod_spec: dict[str, Any], metadata: dict[str, Any] | None = None
                       ) -> tuple[str, list[Violation]]:
    """The strictest level the pod meets, and the rules that keep it from the stricter ones."""
    found = pod_security_violations(pod_spec, metadata)
    if any(v.level == "baseline" for v in found):
        return "privileged", found
    return ("baseline" if found else "restricted"), found


def level_message(what: str, level: str, found: list[Violation], namespace: str) -> str:
    """``what`` needs Pod Security ``level``: why, and the namespace label that allows it."""
    why = "; ".join(str(v) for v in found[:4]) + ("; ..." if len(found) > 4 else "")
    return (f"{what} need the '{level}' Pod Security level, not 'restricted' ({why}): the namespace must allow "
            f"it, e.g. kubectl label namespace {namespace} {ENFORCE_LABEL}={level} --overwrite")
