// qemu-img's size syntax (QEMU's qemu_strtosz), which every size Strata reads follows.
import { describe, expect, it } from 'vitest';
import { strtosz } from '../../../core/chain/size-str';

describe('strtosz', () => {
  it('reads what QEMU reads', () => {
    expect(strtosz('0x10000')).toBe(65536n);
    expect(strtosz('1k')).toBe(1024n);
    expect(strtosz('1.5k')).toBe(1536n);
    expect(strtosz('1.k')).toBe(1024n);
    expect(strtosz('1048576T')).toBe(1n << 60n);
    expect(strtosz('15E')).toBe(15n << 60n);
    expect(strtosz('18446744073709551615')).toBe((1n << 64n) - 1n);
    expect(strtosz('512b')).toBe(512n);
  });
  it('refuses what QEMU refuses', () => {
    for (const s of ['-1', '-1k', '1kilobyte', 'foobar', '1.5', '0x1.5', '1e3k', '64KiB', '', 'k']) expect(strtosz(s), s).toBe('invalid');
    expect(strtosz('16E')).toBe('range');
    expect(strtosz('18446744073709551616')).toBe('range');
  });
});
