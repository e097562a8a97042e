"""Write trimmed copies of KubeRay's RayJob and RayService CRD schemas (ray.io/v1) for
tests/unit/test_deploy_manifests.py.

    git clone https://github.com/ray-project/kuberay && python tests/assets/kuberay/trim_crd.py kuberay

Source: ray-operator/config/crd/bases/ray.io_{rayjobs,rayservices}.yaml. The checked-in copies
were made from commit feeaf72facab4881ba2b179248bb67315634e229 (after v1.7.0). The full CRDs
are 1-1.4 MB, nearly all of it Kubernetes' PodSpec repeated for every pod template. Trimmed:

- the v1 ``openAPIV3Schema`` without ``status``, ``description`` or the CEL rules
  (``x-kubernetes-validations``: jsonschema cannot run them);
- every RayJob / RayService / RayCluster field keeps its full schema, except the embedded
  Kubernetes Service and NetworkPolicy objects (``headService``, ``serveService``,
  ``networkPolicy``), which accept any object;
- a pod template keeps every PodSpec field *name*, but the full schema only of the fields in
  ``POD_SPEC_KEPT``; a container keeps every field but those in ``CONTAINER_LOOSE``, a volume the
  kinds in ``VOLUME_KEPT``; loosened fields accept any value. The pod template, the same in every
  place, is written once under ``$defs``.

So a misspelt or misplaced key is still rejected everywhere (the test closes every object, as
the API server's strict field validation does), and a wrong type wherever the manifests set one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

DROPPED = {"description", "x-kubernetes-validations"}
ANY_OBJECT = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
EMBEDDED_K8S_OBJECTS = {"headService", "serveService", "networkPolicy"}
POD_SPEC_KEPT = {"containers", "initContainers", "volumes", "nodeSelector", "tolerations", "restartPolicy",
                 "serviceAccountName"}
CONTAINER_LOOSE = {"livenessProbe", "readinessProbe", "startupProbe", "lifecycle", "securityContext"}
VOLUME_KEPT = {"name", "persistentVolumeClaim", "secret", "configMap", "emptyDir", "csi", "nfs", "projected"}
POD_TEMPLATE_KEYS = {"template", "submitterPodTemplate"}


def _strip(node):
    if isinstance(node, list):
        return [_strip(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strip(v) for k, v in node.items() if k not in DROPPED and k != "properties"}
    if "properties" in node:
        out["properties"] = {k: (ANY_OBJECT if k in EMBEDDED_K8S_OBJECTS else _strip(v))
                             for k, v in node["properties"].items()}
    return out


def _keep_only(schema: dict, kept) -> dict:
    """``schema`` with every property name, the full schema only for those in ``kept``."""
    return {**schema, "properties": {k: (v if k in kept else {}) for k, v in schema["properties"].items()}}


def _trim_pod_template(template: dict) -> dict:
    spec = template["properties"]["spec"]
    props = dict(spec["properties"])
    for name in ("containers", "initContainers"):
        item = props[name]["items"]
        props[name] = {**props[name], "items": _keep_only(item, set(item["properties"]) - CONTAINER_LOOSE)}
    props["volumes"] = {**props["volumes"], "items": _keep_only(props["volumes"]["items"], VOLUME_KEPT)}
    spec = _keep_only({**spec, "properties": props}, POD_SPEC_KEPT)
    return {**template, "properties": {**template["properties"], "spec": spec}}


def _share_pod_templates(node, defs: dict):
    """Replace every pod template by a $ref to the one copy in ``defs``."""
    if isinstance(node, list):
        return [_share_pod_templates(v, defs) for v in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for k, v in node.items():
        if k == "properties":
            out[k] = {}
            for name, sub in v.items():
                if name in POD_TEMPLATE_KEYS and "spec" in sub.get("properties", {}):
                    sub = _trim_pod_template(sub)
                    if defs.setdefault("PodTemplateSpec", sub) != sub:
                        raise SystemExit(f"pod templates differ at {name!r}: trim them separately")
                    out[k][name] = {"$ref": "#/$defs/PodTemplateSpec"}
                else:
                    out[k][name] = _share_pod_templates(sub, defs)
        else:
            out[k] = _share_pod_templates(v, defs)
    return out


def trimmed(crd_file: Path) -> dict:
    crd = yaml.safe_load(crd_file.read_text())
    [v1] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = dict(v1["schema"]["openAPIV3Schema"])
    schema["properties"] = {k: v for k, v in schema["properties"].items() if k != "status"}
    defs: dict = {}
    schema = _share_pod_templates(_strip(schema), defs)
    return {"kind": crd["spec"]["names"]["kind"], "apiVersion": f"{crd['spec']['group']}/v1",
            "openAPIV3Schema": {**schema, "$defs": defs}}


if __name__ == "__main__":
    bases = Path(sys.argv[1]) / "ray-operator" / "config" / "crd" / "bases"
    here = Path(__file__).parent
    for plural, kind in (("rayjobs", "rayjob"), ("rayservices", "rayservice")):
        out = here / f"{kind}.v1.schema.json"
        out.write_text(json.dumps(trimmed(bases / f"ray.io_{plural}.yaml"), indent=1, sort_keys=True) + "\n")
        print(f"wrote {out} ({out.stat().st_size // 1024} KiB)")
