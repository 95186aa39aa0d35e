#!/usr/bin/env python3
# Self cost (instructions) per function of a callgrind dump taken with `callgrind_control -d`
# (callgrind_annotate puts a mid-run dump's whole cost on `clone`). Usage:
#   scripts/callgrind-self.py FILE [REQUESTS] [TOP]   # instructions per request, top functions
import sys, re, collections
names = {}
self_cost = collections.Counter()
fn = None
skip_next = False
for line in open(sys.argv[1]):
    line = line.rstrip('\n')
    if skip_next:
        skip_next = False
        continue
    m = re.match(r'^(fn|cfn|fl|fi|fe|cfi|cfl|ob|cob)=\((\d+)\)(?: (.*))?$', line)
    if m:
        kind, idx, name = m.groups()
        key = ('fn' if kind in ('fn', 'cfn') else kind, idx)
        if name is not None and kind in ('fn', 'cfn'):
            names[idx] = name
        if kind == 'fn':
            fn = idx
        continue
    if line.startswith('calls='):
        skip_next = True
        continue
    m = re.match(r'^([+-]?\d+|\*)\s+(\d+)$', line)
    if m and fn is not None:
        self_cost[fn] += int(m.group(2))
total = sum(self_cost.values())
n = int(sys.argv[2]) if len(sys.argv) > 2 else 1
print("total", total, "per req", total // n)
for idx, c in self_cost.most_common(int(sys.argv[3]) if len(sys.argv) > 3 else 60):
    nm = names.get(idx, '?')
    nm = re.sub(r'::h[0-9a-f]{16}$', '', nm)
    print(f"{c/n:9.0f} {100*c/total:5.1f}% {nm[:150]}")
