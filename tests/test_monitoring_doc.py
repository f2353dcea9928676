"""docs/monitoring.md says what runphi really exposes.

* Its table of metric families is generated from :data:`runphi.verbs.metrics.FAMILIES`
  (``python -m tests.test_monitoring_doc`` prints it): the doc holds it verbatim, and the
  names in the table are exactly the families' names.
* Every metric the example alert rules and queries use is a series ``runphi metrics``
  exposes, and the label values they compare with are ones runphi emits.
* The example subscriber is an excerpt of docs/examples/cell_health_subscriber.py, word
  for word, and the event types it names exist.
* The YAML blocks (scrape config, alert rules) parse, where PyYAML is installed (it is not
  a dependency of runphi or its tests).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from runphi.backends.base import CellState
from runphi.verbs.metrics import FAMILIES, NODE_FAMILIES, OCI_STATES, ZIC_LABELS

REPO_ROOT = Path(__file__).resolve().parent.parent
DOC = REPO_ROOT / "docs" / "monitoring.md"
SUBSCRIBER = REPO_ROOT / "docs" / "examples" / "cell_health_subscriber.py"
TABLE_HEADER = "| family | type | labels | meaning |"
#: The series a family of each type is exposed as (the OpenMetrics and Prometheus text formats agree).
SUFFIXES = {"gauge": ("",), "counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}


def family_table() -> str:
    """The Markdown table of every family of FAMILIES, in its order: name, type (with the
    suffixes of its series), labels, meaning."""
    rows = [TABLE_HEADER, "| --- | --- | --- | --- |"]
    for name, (kind, meaning, extra) in FAMILIES.items():
        labels = [f"`{label}`" for label in extra]
        if name not in NODE_FAMILIES:
            labels.insert(0, "ZIC labels")
        series = ", ".join(f"`{suffix}`" for suffix in SUFFIXES[kind] if suffix)
        rows.append(f"| `{name}` | {kind}{' ' + series if series else ''} | {', '.join(labels) or '-'} | {meaning} |")
    return "\n".join(rows) + "\n"


def fenced(info: str) -> list[str]:
    """The text of every block of the doc fenced with ```INFO."""
    return re.findall(rf"^```{info}\n(.*?)^```$", DOC.read_text(), re.M | re.S)


def exposed_series() -> set[str]:
    """Every series name ``runphi metrics`` can expose."""
    return {name + suffix for name, (kind, _, _) in FAMILIES.items() for suffix in SUFFIXES[kind]}


def test_the_doc_holds_the_generated_family_table():
    assert family_table() in DOC.read_text(), "regenerate it: python -m tests.test_monitoring_doc"


def test_the_tables_names_are_exactly_the_families():
    text = DOC.read_text()
    table = text[text.index(TABLE_HEADER):].split("\n\n", 1)[0]
    named = re.findall(r"^\| `(\w+)` \|", table, re.M)
    assert sorted(named) == sorted(FAMILIES)
    assert len(named) == len(set(named))


def test_the_doc_names_the_zic_labels_and_the_state_values():
    text = DOC.read_text()
    for label in ZIC_LABELS:
        assert f"`{label}`" in text, label
    for state in (*OCI_STATES, *(state.value for state in CellState)):
        assert f"`{state}`" in text, state


def test_every_metric_the_doc_queries_is_exposed():
    used = {name for block in fenced("yaml") for name in re.findall(r"\brunphi_\w+", block)}
    assert used, "no rules found"
    assert sorted(used - exposed_series()) == []
    rules = "\n".join(fenced("yaml"))
    for state in re.findall(r'\bstate="([^"]*)"', rules):
        assert state in {s.value for s in CellState} | set(OCI_STATES), state


def test_the_alert_rules_cover_failures_console_pools_cpus_and_exits():
    rules = "\n".join(fenced("yaml"))
    for expression in ('runphi_zic_cell_state{state="failed"} == 1', "runphi_zic_failed_cpus > 0",
                       "rate(runphi_zic_console_dropped_bytes_total[5m]) > 0",
                       "runphi_hypervisor_pool_used_pages / runphi_hypervisor_pool_size_pages > 0.9",
                       'runphi_node_resource_free{resource="cpus"} == 0', "runphi_zic_last_exit_status != 0"):
        assert expression in rules, expression


def test_the_subscriber_excerpt_is_the_shipped_example_word_for_word():
    [excerpt] = fenced("python")
    assert excerpt in SUBSCRIBER.read_text()


def test_the_event_types_the_doc_names_exist():
    from runphi.shim import events
    from runphi.shim.proto.events_pb2 import TaskExit
    from runphi.shim.proto.runphi_events_pb2 import CellFailed

    text = DOC.read_text()
    for topic in (events.TASK_CREATE, events.TASK_START, events.TASK_EXIT, events.TASK_DELETE, events.CELL_FAILED):
        assert f"`{topic}`" in text, topic
    for message in (TaskExit, CellFailed):
        assert f"`{message.DESCRIPTOR.full_name}`" in text, message


def test_the_yaml_blocks_parse():
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (not a dependency)")
    documents = [yaml.safe_load(block) for block in fenced("yaml")]
    [rules] = [d for d in documents if "groups" in d]
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert all({"alert", "expr"} <= rule.keys() for rule in alerts), alerts
    [scrape] = [d for d in documents if "scrape_configs" in d]
    assert scrape["scrape_configs"][0]["job_name"] == "runphi"


if __name__ == "__main__":
    sys.stdout.write(family_table())
