"""The check's report as JUnit XML, for CI systems that display test results."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any


GATES = ("faithfulness", "fidelity")


def write_junit(report: dict[str, Any], path: Path, suite_name: str) -> None:
    """One test case per artifact and gate (faithfulness vs its twin, fidelity vs fp32, and the tokenizer
    gate where the artifact has a stock client: an unsupported client is a skipped case, with its reason)."""
    artifacts = report["artifacts"]
    cases = [(target, gate, entry) for target, entry in artifacts.items() for gate in GATES]
    tokenizer_cases = [(target, entry) for target, entry in artifacts.items() if entry.get("tokenizer")]
    failures = sum(not entry[gate]["passed"] for _, gate, entry in cases) + sum(
        not entry["tokenizer"].get("passed", True) for _, entry in tokenizer_cases)
    suite = ET.Element("testsuite", name=suite_name, tests=str(len(cases) + len(tokenizer_cases)),
                       failures=str(failures), errors="0")
    for target, gate, entry in cases:
        result = entry[gate]
        case = ET.SubElement(suite, "testcase", classname=f"{suite_name}.{target}", name=f"{gate}:{entry['entry']}")
        ET.SubElement(case, "system-out").text = "\n".join(
            [f"against = {result['against']}"]
            + [f"{k} = {v}" for k, v in result["metrics"].items() if not isinstance(v, (list, dict))]
        )
        if not result["passed"]:
            # An artifact that could not run fails both gates with the same reason.
            breaches = result["breaches"] or [b for b in entry["breaches"] if not b.startswith(GATES)]
            failure = ET.SubElement(case, "failure", message="; ".join(breaches))
            failure.text = "\n".join(breaches)
    for target, entry in tokenizer_cases:
        gate = entry["tokenizer"]
        case = ET.SubElement(suite, "testcase", classname=f"{suite_name}.{target}", name=f"tokenizer:{entry['entry']}")
        ET.SubElement(case, "system-out").text = "\n".join(
            f"{k} = {v}" for k, v in gate.items() if not isinstance(v, (list, dict)))
        if not gate.get("passed", True):
            breaches = gate.get("breaches") or [gate.get("status", "failed")]
            failure = ET.SubElement(case, "failure", message="; ".join(breaches))
            failure.text = "\n".join(breaches)
        elif gate.get("status") in ("unsupported", "no client", "not run"):
            ET.SubElement(case, "skipped", message=f"{gate.get('status')}: {gate.get('note', '')}")
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)
