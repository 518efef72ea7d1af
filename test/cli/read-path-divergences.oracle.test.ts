// Minimal reproductions of the places where strata's read path and qemu-img (7.2) disagree,
// one image and one assertion each, so each can be run and fixed on its own. The matrix
// (read-path, chains-snapshots) hits the same divergences across many images.
import { truncateSync, writeFileSync } from 'node:fs';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { qemuImg, tempDir, describeOracleText } from '../oracle/qemu';
import { createQcow2, io, snapshot, MiB } from '../oracle/images';
import { expectSameFile, strataOk, syncFiles } from './run-cli';

describeOracleText('read path: minimal divergences from qemu-img', () => {
  let tmp: ReturnType<typeof tempDir>;
  beforeAll(() => { tmp = tempDir('strata-diverge-'); });
  afterAll(() => tmp?.cleanup());

  // qemu's qcow2 driver asks the host file about holes only when it detects metadata
  // preallocation (qcow2_detect_metadata_preallocation: clusters with a refcount >=
  // max(allocated/cluster * 10/9, allocated/cluster + 2)). Otherwise a data cluster is
  // "data": true, "zero": false in full, even where QEMU's copy-on-write left the host file a
  // hole (it zeroes COW areas with fallocate). Run first thing after the write: once the
  // zeroed extents are read into the page cache, SEEK_DATA calls them data and the
  // difference hides.
  it('a partial write into a fresh 64k cluster maps as one data run (no zero+data tail from host holes)', async () => {
    const f = createQcow2(tmp.path('partial.qcow2'), 8 * MiB, {});
    io(f, ['write -P 1 1000 5000']);
    syncFiles(tmp.dir);
    expect(await strataOk('map', '--output=json', f)).toBe(qemuImg('map', '--output=json', f));
  });

  // QCOW2_SUBCLUSTER_UNALLOCATED_ALLOC: qemu reports an offset (BDRV_BLOCK_OFFSET_VALID) for
  // unallocated subclusters of an allocated cluster, so map prints "offset" for them and does
  // not merge them with the unallocated clusters that follow.
  it('extended L2: unallocated subclusters of an allocated cluster carry an offset', async () => {
    const f = createQcow2(tmp.path('subcluster.qcow2'), 8 * MiB, { extended_l2: true });
    io(f, ['write -P 1 0 2048']);
    expect(await strataOk('map', '--output=json', f)).toBe(qemuImg('map', '--output=json', f));
  });

  // QEMU's raw (file-posix) size is the file size rounded up to a whole 512-byte sector.
  it('a raw file of 1000 bytes has virtual size 1024', async () => {
    const f = tmp.path('odd.raw');
    writeFileSync(f, '');
    truncateSync(f, 1000);
    expect(JSON.parse(await strataOk('info', '--output=json', f))).toStrictEqual(JSON.parse(qemuImg('info', '--output=json', f)));
  });

  // qemu-img convert -l loads the snapshot's L1 table temporarily (bdrv_snapshot_load_tmp)
  // and keeps the image's current size: a snapshot taken at 8 MiB of an image now 16 MiB
  // converts to 16 MiB, the part past the snapshot's size reading as zeros.
  it('convert -l of a snapshot taken before the image grew has the current size', async () => {
    const f = createQcow2(tmp.path('grown.qcow2'), 8 * MiB, {});
    io(f, ['write -P 1 0 4096']);
    snapshot(f, 'small');
    qemuImg('resize', '-q', f, String(16 * MiB));
    const theirs = tmp.path('grown-qemu.raw');
    const ours = tmp.path('grown-strata.raw');
    qemuImg('convert', '-O', 'raw', '-l', 'snapshot.name=small', f, theirs);
    await strataOk('convert', '-O', 'raw', '-l', 'snapshot.name=small', f, ours);
    await expectSameFile(ours, theirs);
  });
});
