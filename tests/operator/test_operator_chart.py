"""The Helm chart, checked with real helm, kubernetes-validate and promtool every time."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "baton"
HELM = ROOT / ".venv" / "tools" / "helm"
SCENARIOS = [None] + sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))
RELEASE_NAMESPACE = "baton-system"


def helm(*args: str) -> str:
    if not HELM.exists():
        pytest.fail(f"helm is missing at {HELM.relative_to(ROOT)}: run `make tools`")
    out = subprocess.run([str(HELM), *args], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is missing (it comes with the prometheus package): run "
                    "`make tools`")
    return found


def render(scenario: str | None = None, *extra: str) -> list[dict]:
    args = ["template", "baton", str(CHART), "--namespace", RELEASE_NAMESPACE, "--include-crds"]
    if scenario:
        args += ["-f", str(CHART / "ci" / scenario)]
    return [d for d in yaml.safe_load_all(helm(*args, *extra)) if d]


def test_scenarios_exist():
    assert len(SCENARIOS) >= 4, SCENARIOS


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_lint_strict(scenario):
    args = ["lint", "--strict", str(CHART)]
    if scenario:
        args += ["-f", str(CHART / "ci" / scenario)]
    out = helm(*args)
    assert "0 chart(s) failed" in out, out


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_template_is_valid_kubernetes(scenario):
    args = ["template", "baton", str(CHART), "--namespace", RELEASE_NAMESPACE, "--include-crds"]
    if scenario:
        args += ["-f", str(CHART / "ci" / scenario)]
    manifest = helm(*args)
    validate = Path(sys.executable).with_name("kubernetes-validate")
    out = subprocess.run([str(validate), "--strict", "-"], input=manifest, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ERROR" not in out.stdout + out.stderr

    docs = [d for d in yaml.safe_load_all(manifest) if d]
    crds = {(d["spec"]["group"], d["spec"]["names"]["kind"]): d for d in docs
            if d["kind"] == "CustomResourceDefinition"}
    # Custom resources kubernetes-validate skips: those whose CRD the chart ships are checked
    # against its schema here; PrometheusRules by promtool below; the rest by their shape.
    for doc in docs:
        group = doc["apiVersion"].split("/")[0]
        if (group, doc["kind"]) in crds:
            version = crds[(group, doc["kind"])]["spec"]["versions"][0]
            jsonschema.Draft7Validator(version["schema"]["openAPIV3Schema"]).validate(doc)
        elif group == "monitoring.coreos.com":
            assert doc["kind"] in ("ServiceMonitor", "PrometheusRule"), doc["kind"]
            assert doc["metadata"]["namespace"] == RELEASE_NAMESPACE


def test_template_is_valid_on_the_oldest_supported_kubernetes():
    """Chart.yaml's kubeVersion floor (1.28): the same manifests validate there too."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == ">=1.28.0-0"
    manifest = helm("template", "baton", str(CHART), "--namespace", RELEASE_NAMESPACE,
                    "--include-crds", "-f", str(CHART / "ci" / "monitoring-values.yaml"))
    validate = Path(sys.executable).with_name("kubernetes-validate")
    out = subprocess.run([str(validate), "--strict", "-k", "1.28.0", "-"], input=manifest,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_crds_shipped():
    names = {d["metadata"]["name"] for d in render() if d["kind"] == "CustomResourceDefinition"}
    assert names == {"models.baton.dev", "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}


def operator_deployments(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] == "Deployment"]


def test_operator_deployment_runs_the_operator_entry_point():
    from baton.operator.__main__ import parse_args

    (dep,) = operator_deployments(render())
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-m", "baton.operator"]
    args = parse_args(container["args"])  # the chart's flags are the CLI's flags
    assert args.namespace == [] and args.peering == "baton" and args.priority == 100
    assert args.scanning is True
    # one replica may run standalone when the peering object is missing (and says so)
    assert args.require_peering is False and args.standalone is False
    assert args.worker_image == "ghcr.io/baton-serving/baton-worker:0.1.0"
    assert container["image"] == "ghcr.io/baton-serving/baton-operator:0.1.0"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert dep["spec"]["replicas"] == 1
    for label_set in (dep["spec"]["selector"]["matchLabels"],):
        assert "helm.sh/chart" not in label_set


def test_ha_replicas_get_distinct_priorities():
    from baton.operator.__main__ import parse_args

    deps = operator_deployments(render("ha-values.yaml"))
    priorities = [parse_args(d["spec"]["template"]["spec"]["containers"][0]["args"]).priority
                  for d in deps]
    assert priorities == [200, 199]
    # several replicas never act side by side: without the peering object they wait for it
    assert all(parse_args(d["spec"]["template"]["spec"]["containers"][0]["args"])
               .require_peering for d in deps)
    selectors = [d["spec"]["selector"]["matchLabels"] for d in deps]
    assert selectors[0] != selectors[1]


def rules_of(doc: dict) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for rule in doc["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


NAMESPACED = {
    ("baton.dev", "models", v) for v in ("get", "list", "watch", "patch")} | {
    ("baton.dev", "models/status", v) for v in ("get", "patch")} | {
    ("apps", "deployments", v) for v in ("get", "list", "watch", "create", "patch", "delete")} | {
    (g, r, v) for g, r in [("", "services"), ("", "configmaps"),
                           ("policy", "poddisruptionbudgets"),
                           ("networking.k8s.io", "networkpolicies"),
                           ("monitoring.coreos.com", "podmonitors")]
    for v in ("get", "list", "create", "patch", "delete")} | {
    ("", "pods", v) for v in ("get", "list", "patch")} | {
    ("", "secrets", v) for v in ("get", "create")} | {
    ("", "events", "create")} | {
    ("kopf.dev", "kopfpeerings", v) for v in ("get", "list", "watch", "patch")}
CLUSTER_ONLY = {("apiextensions.k8s.io", "customresourcedefinitions", v) for v in
                ("list", "watch")} | {
    ("kopf.dev", "clusterkopfpeerings", v) for v in ("get", "list", "watch", "patch")}


def test_rbac_is_exactly_what_the_operator_uses():
    docs = render()
    (cluster_role,) = [d for d in docs if d["kind"] == "ClusterRole"]
    assert rules_of(cluster_role) == NAMESPACED | CLUSTER_ONLY
    assert not [d for d in docs if d["kind"] == "Role"]
    text = yaml.safe_dump(cluster_role)
    assert "'*'" not in text
    # Secrets: the Model's certificates, made once; never listed, watched, changed or deleted.
    assert {v for g, r, v in rules_of(cluster_role) if r == "secrets"} == {"get", "create"}


def test_namespaced_rbac_stays_in_the_watched_namespaces():
    from baton.operator.__main__ import parse_args

    docs = render("namespaced-values.yaml")
    (cluster_role,) = [d for d in docs if d["kind"] == "ClusterRole"]
    # Kopf's scanning reads CRDs and, serving a list of namespaces, the namespaces.
    assert rules_of(cluster_role) == {r for r in CLUSTER_ONLY if r[1] != "clusterkopfpeerings"} \
        | {("", "namespaces", "list"), ("", "namespaces", "watch")}
    roles = {d["metadata"]["namespace"]: d for d in docs if d["kind"] == "Role"}
    assert set(roles) == {"llm", "batch"}
    for role in roles.values():
        assert rules_of(role) == NAMESPACED
    bindings = {d["metadata"]["namespace"] for d in docs if d["kind"] == "RoleBinding"}
    assert bindings == {"llm", "batch"}
    peerings = {(d["kind"], d["metadata"].get("namespace")) for d in docs
                if d["apiVersion"] == "kopf.dev/v1"}
    assert peerings == {("KopfPeering", "llm"), ("KopfPeering", "batch")}
    (dep,) = operator_deployments(docs)
    assert parse_args(dep["spec"]["template"]["spec"]["containers"][0]["args"]).namespace == [
        "llm", "batch"]


def test_restricted_install_has_no_cluster_wide_permission():
    from baton.operator.__main__ import parse_args

    docs = render("restricted-values.yaml")
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    (role,) = [d for d in docs if d["kind"] == "Role"]
    assert role["metadata"]["namespace"] == "llm" and rules_of(role) == NAMESPACED
    (dep,) = operator_deployments(docs)
    args = parse_args(dep["spec"]["template"]["spec"]["containers"][0]["args"])
    assert args.scanning is False and args.namespace == ["llm"]
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == "baton-llm"


def test_optional_integrations_are_off_by_default():
    kinds = {d["kind"] for d in render()}
    assert not kinds & {"ServiceMonitor", "PrometheusRule"}
    assert not [d for d in render() if d["kind"] == "ConfigMap"]
    on = {d["kind"] for d in render("monitoring-values.yaml")}
    assert {"ServiceMonitor", "PrometheusRule", "ConfigMap"} <= on


def test_values_are_documented_and_schema_checked():
    values_text = (CHART / "values.yaml").read_text()
    values = yaml.safe_load(values_text)
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert set(values) == set(schema["properties"])
    for key in values:
        assert re.search(rf"^# {key} -- ", values_text, re.M), f"{key} is not documented"
        assert re.match(r"^[a-z][a-zA-Z0-9]*$", key), f"{key} is not flat camelCase"
    jsonschema.Draft7Validator(schema).validate(values)
    bad = subprocess.run([str(HELM), "template", "x", str(CHART), "--set", "replicas=0"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "replicas" in bad.stderr


def grafana_to_promql(expr: str) -> str:
    for var, value in [("$__rate_interval", "5m"), ("$__range", "1h"), ("$namespace", ".*"),
                       ("$model", ".*"), ("$ttft_target", "2.0"), ("$itl_target", "0.05")]:
        expr = expr.replace(var, value)
    return expr


def test_dashboard_queries_parse_and_cover_the_signals(tmp_path):
    dashboard = json.loads((CHART / "dashboards" / "baton.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    joined = "\n".join(exprs)
    for metric in ("baton_time_to_first_token_seconds", "baton_inter_token_latency_seconds",
                   "baton_requests_waiting", "baton_kv_cache_usage_ratio",
                   "baton_state_transfer_bytes_total", "baton_autoscaler_desired_replicas",
                   "baton_autoscaler_decisions_total", "baton_prefix_cache_hit_tokens_total",
                   "baton_prefix_cache_queried_tokens_total",
                   "baton_prefix_cache_snapshot_usage_ratio", "baton_local_prefills_total",
                   "baton_state_transfer_saved_bytes_total"):
        assert metric in joined, metric
    titles = [p["title"] for p in dashboard["panels"]]
    assert "Prefix cache hit ratio" in titles and len(set(titles)) == len(titles)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(set(ids)) == len(ids)
    assert "by (kind)" in joined and "by (role, pool)" in joined
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": grafana_to_promql(e)}
        for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    out = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def prometheus_rule(scenario: str) -> dict:
    (rule,) = [d for d in render(scenario) if d["kind"] == "PrometheusRule"]
    return rule


def test_alert_rules_pass_promtool(tmp_path):
    rule = prometheus_rule("monitoring-values.yaml")
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    out = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}
    assert {"BatonTimeToFirstTokenBudgetFastBurn", "BatonInterTokenLatencyBudgetFastBurn",
            "BatonStateTransferFailures", "BatonPodsPendingInPool"} <= alerts


def test_slo_burn_alert_fires_on_a_burning_model_only(tmp_path):
    """promtool's rule unit test: 20% of one model's requests miss TTFT 2 s (budget 5%),
    another model's all meet it."""
    rule = prometheus_rule("monitoring-values.yaml")
    # monitoring-values sets the TTFT edge to 1.0 s and attainment 0.99: budget 1%.
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    labels = 'namespace="llm", role="router", pool=""'
    series = []
    for model, within in (("burning", 80), ("healthy", 100)):
        series += [
            {"series": f'baton_time_to_first_token_seconds_bucket{{{labels}, model="{model}", '
                       f'le="1.0"}}', "values": f"0+{within}x120"},
            {"series": f'baton_time_to_first_token_seconds_count{{{labels}, model="{model}"}}',
             "values": "0+100x120"},
        ]
    test = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": series,
            "alert_rule_test": [
                {"eval_time": "70m", "alertname": "BatonTimeToFirstTokenBudgetFastBurn",
                 "exp_alerts": [{
                     "exp_labels": {"severity": "critical", "namespace": "llm",
                                    "model": "burning"},
                     "exp_annotations": {
                         "summary": "TimeToFirstToken SLO of llm/burning burns its error "
                                    "budget fast",
                         "description": "20% of requests miss the ttft limit (SLO 0.99); "
                                        "check pending pods, the autoscaler's status and "
                                        "maxReplicas."}}]},
                {"eval_time": "70m", "alertname": "BatonInterTokenLatencyBudgetFastBurn",
                 "exp_alerts": []},
            ],
        }],
    }
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(test))
    out = subprocess.run([promtool(), "test", "rules", "test.yaml"], capture_output=True,
                         text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


def test_chart_example_model_is_valid():
    from baton.operator.crd import crd
    from baton.operator.spec import Model

    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    examples = sorted((CHART / "examples").glob("*.yaml"))
    assert examples
    products = set()
    for path in examples:
        for doc in yaml.safe_load_all(path.read_text()):
            jsonschema.Draft7Validator(schema).validate(doc)
            model = Model.from_resource(doc)
            products |= {p.gpu_product for role in ("prefill", "decode")
                         for p in model.spec.role(role).pools}
    assert {"NVIDIA-B200", "NVIDIA-H100-80GB-HBM3"} <= products
