// The pure parts of `npm run iotests` (scripts/iotests-lib.mjs): which of QEMU's tests it runs,
// how it reads ./check's TAP output, and the table it prints. The runner itself needs QEMU's
// source package and is not part of npm test.
import { describe, expect, it } from 'vitest';
// @ts-expect-error plain JavaScript module without types
import { needsNoVm, parseTapLine, parseTapLines, report } from '../../scripts/iotests-lib.mjs';

describe('iotests runner', () => {
  it('reads the TAP lines of ./check -tap', () => {
    expect(parseTapLine('ok qcow2 001')).toEqual({ test: '001', status: 'pass' });
    expect(parseTapLine('not ok qcow2 122')).toEqual({ test: '122', status: 'fail' });
    expect(parseTapLine('ok qcow2 copy-offloading # SKIP not suitable')).toEqual({ test: 'copy-offloading', status: 'not run' });
    expect(parseTapLine('# diff output')).toBeNull();
    // Two workers' lines run together (seen in a -j 2 run): both results are taken.
    expect(parseTapLines('ok qcow2 292ok qcow2 270')).toEqual([{ test: '292', status: 'pass' }, { test: '270', status: 'pass' }]);
    expect(parseTapLines('not ok qcow2 080ok qcow2 copy-offloading # SKIP not ok here')).toEqual([{ test: '080', status: 'fail' }, { test: 'copy-offloading', status: 'not run' }]);
    expect(parseTapLine('TAP version 13')).toBeNull();
  });

  it('keeps only the tests that start no VM or storage daemon', () => {
    expect(needsNoVm('. ./common.rc\n_make_test_img 64M\n$QEMU_IMG info "$TEST_IMG"\n')).toBe(true);
    expect(needsNoVm('. ./common.qemu\n_launch_qemu -drive file=x\n')).toBe(false);
    expect(needsNoVm('with iotests.VM() as vm:\n    vm.launch()\n')).toBe(false);
    expect(needsNoVm('qsd = QemuStorageDaemon("--blockdev", "x")\n')).toBe(false);
    expect(needsNoVm('$QEMU_PROG -machine none\n')).toBe(false);
  });

  it('lists each test qemu-img passes and strata does not, with its reason or as unexplained', () => {
    const tests = ['001', '002', '003', '004'];
    const qemu = new Map([['001', 'pass'], ['002', 'pass'], ['003', 'pass'], ['004', 'fail']]);
    const strata = new Map([['001', 'pass'], ['002', 'fail'], ['003', 'fail'], ['004', 'pass']]);
    const known = { '002': { reason: 'LUKS is not supported', deliberate: true }, '001': { reason: 'old' } };
    const { text, unexplained } = report({ tests, qemu, strata, known });
    expect(text).toContain('| pass     |        3 |      2 |');
    expect(text).toContain('Passed by qemu-img, not by strata: 2 (1 deliberate)');
    expect(text).toContain('002      fail: deliberate: LUKS is not supported');
    expect(text).toContain('003      fail: UNEXPLAINED');
    expect(text).toContain('Passed by strata, not by qemu-img: 004');
    expect(text).toContain('no longer different: 001');
    expect(unexplained).toBe(1);
  });
});
