// A raw image whose format was probed (no -f): as QEMU's raw driver, a write that would make
// its first sector probe as another format is refused (qemu-io: "Operation not permitted"),
// so the next open cannot read it as, say, a qcow2 image naming any backing file it likes.
import { copyFileSync, writeFileSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { afterAll, expect, it } from 'vitest';
import { describeOracle, tempDir } from '../../oracle/qemu';
import { fileHash, strata } from '../jobs/helpers';

/** The first sector of an image of each format QEMU probes by content. */
function header(kind: string): Buffer {
  const b = Buffer.alloc(512);
  switch (kind) {
    case 'qcow2': b.writeUInt32BE(0x514649fb, 0); b.writeUInt32BE(3, 4); break;
    case 'qcow': b.writeUInt32BE(0x514649fb, 0); b.writeUInt32BE(1, 4); break;
    case 'qed': b.writeUInt32LE(0x00444551, 0); break;
    case 'vmdk': b.write('KDMV', 0); break;
    case 'vpc': b.write('conectix', 0); break;
    case 'vhdx': b.write('vhdxfile', 0); break;
    case 'vdi': b.writeUInt32LE(0xbeda107f, 0x40); break;
    case 'luks': b.write('LUKS', 0); b[4] = 0xba; b[5] = 0xbe; b.writeUInt16BE(1, 6); break;
    default: throw new Error(kind);
  }
  return b;
}

function qemuIoWrite(file: string, data: string, offset: number, len: number, format?: string): string {
  const r = spawnSync('qemu-io', [...(format ? ['-f', format] : []), '-c', `write -s ${data} ${offset} ${len}`, file], { encoding: 'utf8' });
  return `${r.stdout}${r.stderr}`;
}

describeOracle('writes to the first sector of a probed raw image', () => {
  const t = tempDir('strata-raw-probe-');
  afterAll(() => t.cleanup());

  for (const kind of ['qcow2', 'qcow', 'qed', 'vmdk', 'vpc', 'vhdx', 'vdi', 'luks']) {
    it(`data that would probe as ${kind}: refused by qemu-io and strata io without -f (file unchanged), written with -f raw`, async () => {
      const data = t.path(`${kind}.bin`);
      writeFileSync(data, header(kind));
      const img = t.path(`${kind}.raw`);
      writeFileSync(img, Buffer.alloc(1 << 20));
      const theirs = t.path(`${kind}-qemu.raw`);
      copyFileSync(img, theirs);
      expect(qemuIoWrite(theirs, data, 0, 512)).toMatch(/Operation not permitted/);
      const before = fileHash(img);
      const r = await strata('io', '-c', `write -s ${data} 0 512`, img);
      expect(r.code).toBe(1);
      expect(r.err).toMatch(new RegExp(`would make the image probe as ${kind}`));
      expect(fileHash(img)).toBe(before);
      const ok = await strata('io', '-f', 'raw', '-c', `write -s ${data} 0 512`, img);
      expect(ok.code, ok.err).toBe(0);
    });
  }

  it('a partial write that completes a qcow2 header is refused; one that does not (version 0) is written, as by QEMU', async () => {
    const img = t.path('partial.raw');
    const sector = Buffer.alloc(1 << 20);
    sector.writeUInt32BE(3, 4); // a version field already there
    writeFileSync(img, sector);
    const magic = t.path('magic4.bin');
    writeFileSync(magic, Buffer.from([0x51, 0x46, 0x49, 0xfb]));
    const theirs = t.path('partial-qemu.raw');
    copyFileSync(img, theirs);
    expect(qemuIoWrite(theirs, magic, 0, 4)).toMatch(/Operation not permitted/);
    expect((await strata('io', '-c', `write -s ${magic} 0 4`, img)).code).toBe(1);
    const fresh = t.path('fresh.raw');
    writeFileSync(fresh, Buffer.alloc(1 << 20));
    copyFileSync(fresh, theirs);
    expect(qemuIoWrite(theirs, magic, 0, 4)).toMatch(/wrote 4\/4/);
    const r = await strata('io', '-c', `write -s ${magic} 0 4`, fresh);
    expect(r.code, r.err).toBe(0);
    expect(fileHash(fresh)).toBe(fileHash(theirs));
  });
});
