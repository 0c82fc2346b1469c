"""JUnit XML for a kit run, as kernel CIs read it: one <testsuite> per kit, one <testcase>
per step and scenario, <failure message="..."> or <skipped message="...">, and the
scenario's step notes in <system-out>."""

from __future__ import annotations

import socket
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path

from pyvmm.check.outcomes import FAIL, SKIP
from pyvmm.check.runner import Result


def build(kit: str, results: list[Result], seconds: float, properties: dict[str, str] | None = None
          ) -> ET.ElementTree:
    suites = ET.Element("testsuites")
    suite = ET.SubElement(suites, "testsuite", {
        "name": f"pyvmm.check.{kit}",
        "tests": str(len(results)),
        "failures": str(sum(1 for r in results if r.status == FAIL)),
        "errors": "0",
        "skipped": str(sum(1 for r in results if r.status == SKIP)),
        "time": f"{seconds:.3f}",
        "timestamp": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        "hostname": socket.gethostname(),
    })
    suites.set("tests", suite.get("tests"))
    suites.set("failures", suite.get("failures"))
    suites.set("time", suite.get("time"))
    if properties:
        props = ET.SubElement(suite, "properties")
        for name, value in properties.items():
            ET.SubElement(props, "property", {"name": name, "value": str(value)})
    for r in results:
        case = ET.SubElement(suite, "testcase", {"classname": f"pyvmm.check.{kit}", "name": r.name,
                                                 "time": f"{r.seconds:.3f}"})
        first_line = r.message.splitlines()[0] if r.message else ""
        if r.status == FAIL:
            failure = ET.SubElement(case, "failure", {"message": first_line, "type": "CheckFailed"})
            failure.text = r.message
        elif r.status == SKIP:
            ET.SubElement(case, "skipped", {"message": first_line})
        out = ([f"expects: {r.expects}"] if r.expects else []) + r.notes
        if out:
            ET.SubElement(case, "system-out").text = "\n".join(out)
    ET.indent(suites)
    return ET.ElementTree(suites)


def write(path: Path, kit: str, results: list[Result], seconds: float,
          properties: dict[str, str] | None = None) -> None:
    build(kit, results, seconds, properties).write(path, encoding="utf-8", xml_declaration=True)
