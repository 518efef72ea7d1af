// The pure parts of the iotests runner (scripts/iotests.mjs): which tests qualify, how ./check's
// TAP lines read, and the table. Kept apart so that test/iotests/runner.test.ts can check them
// without QEMU's source package.

// A test needs a VM (or the storage daemon) when its script starts one: bash tests through
// common.qemu or $QEMU_PROG, python tests through iotests.VM / QemuStorageDaemon.
export const NEEDS_VM = /_launch_qemu|common\.qemu|iotests\.VM\b|QemuStorageDaemon|\$QEMU_PROG|QSD_PROG|qemu_prog|_run_qemu|\$QEMU\b|_launch_qsd/;

/** True when a test script (its text) needs no VM. */
export function needsNoVm(script) {
  return !NEEDS_VM.test(script);
}

/**
 * One line of `./check -tap`: { test, status } with status 'pass', 'fail' or 'not run', or null
 * for any other line (diagnostics, the plan).
 */
/**
 * The results on one line of `./check -j N -tap` output: its workers share stdout, and one's line
 * can run into the next one's ("ok qcow2 292ok qcow2 270"); each is taken.
 */
export function parseTapLines(line) {
  return line.replace(/(\S)((?:not )?ok qcow2 )/g, '$1\n$2').split('\n').map(parseTapLine).filter(Boolean);
}

export function parseTapLine(line) {
  const m = /^(ok|not ok) \S+ (\S+)( # SKIP)?/.exec(line);
  if (!m) return null;
  return { test: m[2], status: m[1] === 'not ok' ? 'fail' : m[3] ? 'not run' : 'pass' };
}

/**
 * The report: counts of both sides, the tests qemu-img passes and strata does not with their
 * reasons from known (test -> { reason, deliberate? }), and the entries of known that no longer
 * differ. Returns { text, unexplained }.
 */
export function report({ tests, qemu, strata, known, header, badFile }) {
  const count = (m, s) => tests.filter((t) => m.get(t) === s).length;
  const lines = [];
  if (header) lines.push(header, '');
  lines.push('|          | qemu-img | strata |');
  lines.push('|----------|---------:|-------:|');
  for (const s of ['pass', 'fail', 'not run']) lines.push(`| ${s.padEnd(8)} | ${String(count(qemu, s)).padStart(8)} | ${String(count(strata, s)).padStart(6)} |`);
  const worse = tests.filter((t) => qemu.get(t) === 'pass' && strata.get(t) !== 'pass');
  const better = tests.filter((t) => qemu.get(t) !== 'pass' && strata.get(t) === 'pass');
  let unexplained = 0;
  lines.push('');
  if (!worse.length) lines.push('strata passes every test qemu-img passes.');
  else {
    const deliberate = worse.filter((t) => known[t]?.deliberate).length;
    lines.push(`Passed by qemu-img, not by strata: ${worse.length} (${deliberate} deliberate)`);
    for (const t of worse) {
      const k = known[t];
      if (!k) unexplained++;
      const why = k ? `${k.deliberate ? 'deliberate: ' : ''}${k.reason}` : `UNEXPLAINED (diff: ${badFile ? badFile(t) : `${t}.out.bad`})`;
      lines.push(`  ${t.padEnd(8)} ${strata.get(t) ?? 'missing'}: ${why}`);
    }
  }
  if (better.length) lines.push(`Passed by strata, not by qemu-img: ${better.join(' ')}`);
  const stale = Object.keys(known).filter((t) => tests.includes(t) && !worse.includes(t));
  if (stale.length) lines.push(`Listed in test/iotests/known.json but no longer different: ${stale.join(' ')}`);
  return { text: lines.join('\n') + '\n', unexplained };
}
