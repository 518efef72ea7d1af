// A small sample library for a first look: a base shared by two overlays, a three-deep chain,
// internal snapshots, a compressible image and an overlay whose backing file is missing.
// Made with Strata's own engine (no qemu-img needed), in a temporary folder, in well under a
// second.
import { mkdtempSync, mkdirSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createImage } from '../../core/jobs/create';
import { openImageFile, closeChain } from '../../core/chain/open';
import { Qcow2Writable } from '../../core/engine/qcow2-write';
import { createSnapshot } from '../../core/engine/snapshots';

const MiB = 1 << 20;

/** Writes `blocks` of `size` bytes with a repeating pattern of `byte` at the given offsets (MiB). */
async function fill(path: string, byte: number, offsetsMiB: number[], size = MiB): Promise<void> {
  const img = await openImageFile(path, { writable: true });
  try {
    const w = img as Qcow2Writable;
    const buf = Buffer.alloc(size);
    for (let i = 0; i < size; i++) buf[i] = (byte + (i % 251)) & 0xff;
    for (const off of offsetsMiB) await w.write(buf, off * MiB);
    await w.flush();
  } finally {
    await closeChain(img);
  }
}

async function snapshot(path: string, names: string[]): Promise<void> {
  const img = await openImageFile(path, { writable: true });
  try {
    for (const n of names) await createSnapshot(img as Qcow2Writable, n);
  } finally {
    await closeChain(img);
  }
}

/** Creates the sample library in a new folder under `parent` (the system's temp folder) and returns it. */
export async function createDemoLibrary(parent = tmpdir()): Promise<string> {
  const dir = mkdtempSync(join(parent, 'strata-demo-'));
  const at = (n: string) => join(dir, n);
  const q = (path: string, size: number, backing?: string) =>
    createImage(path, { format: 'qcow2', size, ...(backing ? { backingFile: backing, backingFormat: 'qcow2' as const } : {}) });

  // A golden image shared by two desktops.
  await q(at('debian-12-base.qcow2'), 512 * MiB);
  await fill(at('debian-12-base.qcow2'), 0x11, [0, 1, 2, 3, 8, 9, 64, 65, 200]);
  await q(at('desktop-alice.qcow2'), 512 * MiB, 'debian-12-base.qcow2');
  await fill(at('desktop-alice.qcow2'), 0x21, [1, 100, 101]);
  await q(at('desktop-bob.qcow2'), 512 * MiB, 'debian-12-base.qcow2');
  await fill(at('desktop-bob.qcow2'), 0x31, [2, 300]);
  await snapshot(at('desktop-bob.qcow2'), ['before-upgrade', 'after-upgrade']);

  // A three-deep chain of external snapshots: base <- installed <- testing.
  mkdirSync(at('webserver'));
  await q(at('webserver/web-base.qcow2'), 256 * MiB);
  await fill(at('webserver/web-base.qcow2'), 0x41, [0, 1, 2, 3, 4, 5, 6, 7]);
  await q(at('webserver/web-installed.qcow2'), 256 * MiB, 'web-base.qcow2');
  await fill(at('webserver/web-installed.qcow2'), 0x51, [4, 5, 6, 40]);
  await q(at('webserver/web-testing.qcow2'), 256 * MiB, 'web-installed.qcow2');
  await fill(at('webserver/web-testing.qcow2'), 0x61, [5, 41]);

  // A standalone image with snapshots and room to compact.
  await q(at('windows-scratch.qcow2'), 1024 * MiB);
  await fill(at('windows-scratch.qcow2'), 0x71, [0, 10, 20, 30, 40]);
  await snapshot(at('windows-scratch.qcow2'), ['clean-install']);

  // An overlay whose backing file was moved away (the library offers candidates and the fix).
  mkdirSync(at('archive'));
  await q(at('archive/old-base.qcow2'), 128 * MiB);
  await fill(at('archive/old-base.qcow2'), 0x81, [0]);
  await createImage(at('orphaned-clone.qcow2'), { format: 'qcow2', size: 128 * MiB, backingFile: 'old-base.qcow2', backingFormat: 'qcow2', unsafe: true });

  // A raw disk, as raw images are kept next to qcow2 ones.
  await createImage(at('data-disk.raw'), { format: 'raw', size: 64 * MiB });
  writeFileSync(at('README.txt'), 'A sample library made by Strata. Delete this folder when you are done with it.\n');
  return dir;
}
