"""The check's report as JUnit XML, for CI systems that display test results."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any


def write_junit(report: dict[str, Any], path: Path, suite_name: str) -> None:
    artifacts = report["artifacts"]
    failures = sum(not a["passed"] for a in artifacts.values())
    suite = ET.Element("testsuite", name=suite_name, tests=str(len(artifacts)), failures=str(failures), errors="0")
    for target, entry in artifacts.items():
        case = ET.SubElement(suite, "testcase", classname=suite_name, name=f"{target}:{entry['entry']}")
        metrics = entry["metrics"]
        ET.SubElement(case, "system-out").text = "\n".join(
            f"{k} = {v}" for k, v in metrics.items() if not isinstance(v, list)
        )
        if not entry["passed"]:
            failure = ET.SubElement(case, "failure", message="; ".join(entry["breaches"]))
            failure.text = "\n".join(entry["breaches"])
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)
