"""Parses Prometheus text on stdin with prometheus_client's own parser and prints every sample
as JSON: [{"family", "type", "name", "labels", "value"}]. A parse error exits non-zero."""
import json
import sys

try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError:
    sys.exit("prometheus_client is missing: python3 -m pip install prometheus_client")

samples = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        samples.append(
            {
                "family": family.name,
                "type": family.type,
                "name": s.name,
                "labels": s.labels,
                "value": s.value,
            }
        )
json.dump(samples, sys.stdout)
