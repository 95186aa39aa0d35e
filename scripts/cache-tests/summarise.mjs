// Summarises http-cache-tests results (the JSON its CLI prints) per target and per kind.
//
//   node summarise.mjs [--gate TARGET:N] [--json OUT] NAME=results.json [NAME=results.json …]
//
// Counting follows the suite itself: each test's kind is `required` (also when unset),
// `optimal` or `check`, and the result symbol is the suite's own determineTestResult() with
// dependencies honoured (a test whose `depends_on` did not pass is ⚪ "dependency failed",
// not a pass). Tests marked browser_only are not run by the CLI and are not counted.
// "required passed" is the number of required tests whose symbol is ✅, as on the results
// page; every other required result (⛔ failed, ⚪ dependency failed, 🔹 setup failed,
// ↻ retried, ⁉️ harness error, - untested) counts as not passed.
//
// --gate TARGET:N exits 1 unless TARGET was summarised, passed at least N required tests and
// passed more required tests than every other target summarised (the issue-9 target).
import fs from 'node:fs'
import path from 'node:path'
import { fileURLToPath } from 'node:url'

const here = path.dirname(fileURLToPath(import.meta.url))
const suiteDir = path.join(here, 'node_modules', 'http-cache-tests')
const suitePkg = JSON.parse(fs.readFileSync(path.join(suiteDir, 'package.json'), 'utf8'))
const { default: tests } = await import(path.join(suiteDir, 'tests', 'index.mjs'))
const { default: surrogate } = await import(path.join(suiteDir, 'tests', 'surrogate-control.mjs'))
const display = await import(path.join(suiteDir, 'lib', 'display.mjs'))
tests.push(surrogate) // the CLI runs these too (cli.mjs)

let gate = null
let jsonOut = null
const inputs = []
const argv = process.argv.slice(2)
for (let i = 0; i < argv.length; i++) {
  if (argv[i] === '--gate') gate = argv[++i]
  else if (argv[i] === '--json') jsonOut = argv[++i]
  else inputs.push(argv[i])
}

const SYMBOL = { '✅': 'pass', '⛔️': 'fail', '⚠️': 'not_optimal', Y: 'yes', N: 'no', '🔹': 'setup_fail', '⁉️': 'harness_fail', '⚪️': 'dependency_fail', '↻': 'retry', '-': 'untested' }

const counted = [] // { suite, test, kind }
for (const suite of tests) {
  for (const test of suite.tests) {
    if (test.browser_only === true) continue
    counted.push({ suite, test, kind: test.kind || 'required' })
  }
}
const totals = {}
for (const c of counted) totals[c.kind] = (totals[c.kind] || 0) + 1

function reasonFor (test, results) {
  const r = results[test.id]
  if (r === undefined) return 'not run'
  if (test.depends_on) {
    const failed = test.depends_on.filter(d => !['✅', 'Y'].includes(display.determineTestResult(tests, d, results)[2]))
    if (failed.length) return `depends on ${failed.join(', ')}, which did not pass`
  }
  if (r === true) return ''
  return `${r[0]}: ${r[1]}`
}

const summaries = []
for (const input of inputs) {
  const eq = input.indexOf('=')
  const name = input.slice(0, eq)
  const file = input.slice(eq + 1)
  const results = JSON.parse(fs.readFileSync(file, 'utf8'))
  const byKind = {}
  const failingRequired = []
  const failsBySuite = {}
  for (const { suite, test, kind } of counted) {
    const sym = display.determineTestResult(tests, test.id, results)[2]
    const outcome = SYMBOL[sym] || sym
    byKind[kind] = byKind[kind] || {}
    byKind[kind][outcome] = (byKind[kind][outcome] || 0) + 1
    if (kind === 'required' && outcome !== 'pass') {
      failingRequired.push({ suite: suite.name, id: test.id, outcome, reason: reasonFor(test, results) })
      failsBySuite[suite.name] = (failsBySuite[suite.name] || 0) + 1
    }
  }
  summaries.push({ name, file, byKind, failingRequired, failsBySuite })
}

const n = (s, kind, outcome) => (s.byKind[kind] && s.byKind[kind][outcome]) || 0
const pad = (v, w) => String(v).padStart(w)
const padr = (v, w) => String(v).padEnd(w)
const W = Math.max(8, ...summaries.map(s => s.name.length))
const CW = W + 2

console.log(`http-cache-tests ${suitePkg.version}: ${totals.required} required, ${totals.optimal} optimal, ${totals.check} check tests counted (browser_only excluded)`)
console.log('')
console.log(`${padr('target', W)} | ${'required: pass  fail  dep  setup other'} | ${'optimal: pass  !opt  other'} | ${'check: yes   no other'}`)
for (const s of summaries) {
  const rOther = totals.required - n(s, 'required', 'pass') - n(s, 'required', 'fail') - n(s, 'required', 'dependency_fail') - n(s, 'required', 'setup_fail')
  const oOther = totals.optimal - n(s, 'optimal', 'pass') - n(s, 'optimal', 'not_optimal')
  const cOther = totals.check - n(s, 'check', 'yes') - n(s, 'check', 'no')
  console.log(`${padr(s.name, W)} | ${pad(n(s, 'required', 'pass'), 14)}${pad(n(s, 'required', 'fail'), 6)}${pad(n(s, 'required', 'dependency_fail'), 5)}${pad(n(s, 'required', 'setup_fail'), 7)}${pad(rOther, 6)} | ${pad(n(s, 'optimal', 'pass'), 13)}${pad(n(s, 'optimal', 'not_optimal'), 6)}${pad(oOther, 7)} | ${pad(n(s, 'check', 'yes'), 10)}${pad(n(s, 'check', 'no'), 5)}${pad(cOther, 6)}`)
}
console.log('')
console.log('required = passed/not passed of ' + totals.required + '; dep = a test it depends on did not pass; other = retry, harness error or not run')

// Where they lose: required tests not passed, per test group (the suite's "suites").
const suiteNames = [...new Set(counted.filter(c => c.kind === 'required').map(c => c.suite.name))]
const suiteTotals = {}
for (const c of counted) if (c.kind === 'required') suiteTotals[c.suite.name] = (suiteTotals[c.suite.name] || 0) + 1
console.log('')
console.log('required tests not passed, per test group:')
console.log(`${padr('group', 44)}${pad('of', 4)}${summaries.map(s => pad(s.name, CW)).join('')}`)
for (const g of suiteNames) {
  if (!summaries.some(s => s.failsBySuite[g])) continue
  console.log(`${padr(g, 44)}${pad(suiteTotals[g], 4)}${summaries.map(s => pad(s.failsBySuite[g] || 0, CW)).join('')}`)
}

for (const s of summaries) {
  console.log('')
  console.log(`${s.name}: ${s.failingRequired.length} required tests not passed (results: ${s.file})`)
  for (const f of s.failingRequired) {
    console.log(`  ${padr(f.outcome, 15)} ${f.id} — ${f.reason.replace(/\s+/g, ' ').slice(0, 160)}`)
  }
}

if (jsonOut) {
  fs.writeFileSync(jsonOut, JSON.stringify({ suite: `http-cache-tests ${suitePkg.version}`, totals, targets: summaries }, null, 2))
}

let exit = 0
if (gate) {
  const [target, min] = gate.split(':')
  const me = summaries.find(s => s.name === target)
  const mine = me ? n(me, 'required', 'pass') : -1
  const best = Math.max(-1, ...summaries.filter(s => s.name !== target).map(s => n(s, 'required', 'pass')))
  if (!me) {
    console.log(`\ngate: ${target} has no results`)
    exit = 1
  } else if (mine < Number(min) || mine <= best) {
    console.log(`\ngate: ${target} passed ${mine} required tests; needs at least ${min} and more than ${best}`)
    exit = 1
  } else {
    console.log(`\ngate: ${target} passed ${mine} required tests (≥ ${min}, > ${best})`)
  }
}
process.exit(exit)
