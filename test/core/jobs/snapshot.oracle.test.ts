// Internal snapshots against qemu-img: strata's create / apply / delete restore exact content and
// leave no leaks; snapshots made by either tool are listed identically and applied by the other;
// compressed clusters and extended-L2 images (with a backing file) included.
import { expect, it } from 'vitest';
import { qemuImg, qemuIo, tempDir, describeOracleText } from '../../oracle/qemu';
import { expectClean, guestHash, qemuInfo, strataOk } from './helpers';

async function expectSameList(file: string): Promise<string> {
  const ours = (await strataOk('snapshot', '-l', file)).out;
  const theirs = qemuImg('snapshot', '-l', file);
  expect(ours).toBe(theirs);
  return ours;
}

async function strataIo(file: string, cmds: string[]): Promise<void> {
  await strataOk('io', ...cmds.flatMap((c) => ['-c', c]), file);
}

function names(file: string): string[] {
  return (qemuInfo(file).snapshots ?? []).map((s) => s.name);
}

interface Layout {
  name: string;
  /** Builds the image (and any backing file) and returns its path. */
  make: (path: (n: string) => string) => string;
  /** Guest writes between snapshots, as qemu-io commands; the second set starts with a full write,
   *  so the content it leaves does not depend on what was there. Compressed writes need an
   *  unallocated cluster in qemu-io: each follows a discard. */
  more: string[][];
}

const LAYOUTS: Layout[] = [
  {
    name: '64 KiB clusters',
    make: (path) => {
      const img = path('img.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', img, '16M');
      qemuIo(img, ['write -P 0x11 0 4M', 'write -P 0x12 6M 100000', 'write -z 8M 1M', 'write -P 0x13 15M 1M']);
      return img;
    },
    more: [
      ['write -P 0x21 1M 2M', 'write -P 0x22 6M 4096', 'write -z 15M 64k', 'discard 0 64k', 'write -P 0x23 12M 3000'],
      ['write -P 0x31 0 16M', 'write -z 4M 4M', 'discard 10M 2M'],
    ],
  },
  {
    name: 'compressed clusters (zlib)',
    make: (path) => {
      const src = path('src.qcow2');
      const img = path('img.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', src, '16M');
      qemuIo(src, ['write -P 0x41 0 6M', 'write -P 0x42 7M 1M', 'write -P 0x43 12M 4M']);
      qemuImg('convert', '-c', '-O', 'qcow2', src, img);
      return img;
    },
    more: [
      // Partial writes over compressed clusters, zeros and discards of them, a compressed write.
      ['write -P 0x51 100000 5000', 'write -P 0x52 7M 64k', 'write -z 1M 1M', 'discard 12M 64k', 'discard 3M 64k', 'write -c -P 0x53 3M 64k'],
      ['write -P 0x61 0 16M', 'discard 13M 128k', 'write -c -P 0x62 13M 128k', 'write -z 14M 70000'],
    ],
  },
  {
    name: 'compressed clusters (zstd, 4 KiB clusters)',
    make: (path) => {
      const src = path('src.qcow2');
      const img = path('img.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', src, '8M');
      qemuIo(src, ['write -P 0x44 0 3M', 'write -P 0x45 5M 2M']);
      qemuImg('convert', '-c', '-O', 'qcow2', '-o', 'compression_type=zstd,cluster_size=4k', src, img);
      return img;
    },
    more: [
      ['write -P 0x54 10000 20000', 'write -z 5M 4k', 'discard 6M 8k', 'discard 1M 4k', 'write -c -P 0x55 1M 4k'],
      ['write -P 0x64 0 8M'],
    ],
  },
  {
    name: 'extended L2 overlay with a backing file',
    make: (path) => {
      const base = path('base.qcow2');
      const img = path('img.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', base, '16M');
      qemuIo(base, ['write -P 0x71 0 16M']);
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=64k,extended_l2=on', '-b', 'base.qcow2', '-F', 'qcow2', img);
      qemuIo(img, ['write -P 0x72 2048 2048', 'write -P 0x73 1M 10000', 'write -z 2M 6144', 'write -P 0x74 5M 1M', 'discard 5M 2048']);
      return img;
    },
    more: [
      ['write -P 0x81 4096 1000', 'write -z 1M 2048', 'write -P 0x82 2M 2048', 'discard 5M 64k', 'write -P 0x83 9M 3M'],
      ['write -P 0x91 0 16M', 'write -z 10M 2048', 'discard 12M 64k'],
    ],
  },
  {
    name: 'extended L2, 128 KiB clusters, standalone',
    make: (path) => {
      const img = path('img.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=128k,extended_l2=on', img, '16M');
      qemuIo(img, ['write -P 0xa1 4096 8192', 'write -P 0xa2 1M 1M', 'write -z 3M 4096']);
      return img;
    },
    more: [
      ['write -P 0xb1 0 4096', 'write -P 0xb2 1M 4096', 'write -z 1100000 10000', 'discard 1536k 128k'],
      ['write -P 0xc1 0 16M'],
    ],
  },
];

describeOracleText('internal snapshots against qemu-img', () => {
  for (const L of LAYOUTS) {
    it(`${L.name}: strata create, write (strata io), apply restores, delete leaves no leaks`, async () => {
      const t = tempDir();
      try {
        const img = L.make(t.path);
        const h0 = guestHash(img);
        await strataOk('snapshot', '-c', 'S1', img);
        expectClean(img);
        await strataIo(img, L.more[0]!);
        const h1 = guestHash(img);
        expect(h1).not.toBe(h0);
        await strataOk('snapshot', '-c', 'S2', img);
        await strataIo(img, L.more[1]!);
        const h2 = guestHash(img);
        expectClean(img);
        expect(names(img)).toEqual(['S1', 'S2']);
        await expectSameList(img);
        expect(guestHash(img, { snapshot: 'S1' })).toBe(h0);
        expect(guestHash(img, { snapshot: 'S2' })).toBe(h1);

        await strataOk('snapshot', '-a', 'S1', img);
        expectClean(img);
        expect(guestHash(img)).toBe(h0);
        // Writing after an apply must not disturb the snapshots sharing those clusters.
        await strataIo(img, L.more[1]!);
        expect(guestHash(img)).toBe(h2);
        await strataOk('snapshot', '-a', 'S2', img);
        expectClean(img);
        expect(guestHash(img)).toBe(h1);
        expect(guestHash(img, { snapshot: 'S1' })).toBe(h0);

        await strataOk('snapshot', '-d', 'S1', img);
        expectClean(img);
        expect(names(img)).toEqual(['S2']);
        expect(guestHash(img)).toBe(h1);
        expect(guestHash(img, { snapshot: 'S2' })).toBe(h1);
        await strataOk('snapshot', '-d', 'S2', img);
        expectClean(img);
        expect(names(img)).toEqual([]);
        expect((await strataOk('snapshot', '-l', img)).out).toBe(qemuImg('snapshot', '-l', img));
        expect(guestHash(img)).toBe(h1);
      } finally {
        t.cleanup();
      }
    });

    it(`${L.name}: snapshots made by qemu-img list the same and apply/delete in strata`, async () => {
      const t = tempDir();
      try {
        const img = L.make(t.path);
        const h0 = guestHash(img);
        qemuImg('snapshot', '-c', 'first', img);
        qemuIo(img, L.more[0]!);
        const h1 = guestHash(img);
        qemuImg('snapshot', '-c', 'second snapshot with a long name', img);
        qemuImg('snapshot', '-c', 'x', img);
        // A name that is another snapshot's ID: IDs are 1, 2, 4 after this; "1" is ID 4.
        qemuImg('snapshot', '-c', '1', img);
        qemuImg('snapshot', '-d', 'x', img);
        qemuIo(img, L.more[1]!);
        const h2 = guestHash(img);
        const list = await expectSameList(img);
        expect(list).toContain('second snapshot with a long name');
        expect((qemuInfo(img).snapshots ?? []).map((s) => [s.id, s.name])).toEqual([['1', 'first'], ['2', 'second snapshot with a long name'], ['4', '1']]);

        await strataOk('snapshot', '-a', 'second snapshot with a long name', img);
        expectClean(img);
        expect(guestHash(img)).toBe(h1);
        // As in qemu-img, an ID matches before a name: "1" is the snapshot 'first'.
        await strataOk('snapshot', '-a', '1', img);
        expectClean(img);
        expect(guestHash(img)).toBe(h0);
        qemuIo(img, L.more[1]!);
        expect(guestHash(img)).toBe(h2);
        await strataOk('snapshot', '-d', 'second snapshot with a long name', img);
        expectClean(img);
        await expectSameList(img);
        expect(names(img)).toEqual(['first', '1']);
        expect(guestHash(img, { snapshot: 'first' })).toBe(h0);
        await strataOk('snapshot', '-d', '4', img);
        expect(names(img)).toEqual(['first']);
        await strataOk('snapshot', '-d', 'first', img);
        expectClean(img);
        expect(names(img)).toEqual([]);
        expect(guestHash(img)).toBe(h2);
      } finally {
        t.cleanup();
      }
    });

    it(`${L.name}: snapshots made by strata list the same and apply/delete in qemu-img`, async () => {
      const t = tempDir();
      try {
        const img = L.make(t.path);
        const h0 = guestHash(img);
        await strataOk('snapshot', '-c', 'S1', img);
        qemuIo(img, L.more[0]!);
        const h1 = guestHash(img);
        await strataOk('snapshot', '-c', 'S2', img);
        qemuIo(img, L.more[1]!);
        await expectSameList(img);
        expect(names(img)).toEqual(['S1', 'S2']);

        qemuImg('snapshot', '-a', 'S1', img);
        expectClean(img);
        expect(guestHash(img)).toBe(h0);
        qemuImg('snapshot', '-a', 'S2', img);
        expectClean(img);
        expect(guestHash(img)).toBe(h1);
        qemuImg('snapshot', '-d', 'S1', img);
        expectClean(img);
        // A snapshot qemu-img creates after ours gets the next ID.
        qemuImg('snapshot', '-c', 'Q', img);
        await expectSameList(img);
        expect((qemuInfo(img).snapshots ?? []).map((s) => [s.id, s.name])).toEqual([['2', 'S2'], ['3', 'Q']]);
        qemuImg('snapshot', '-d', 'S2', img);
        qemuImg('snapshot', '-d', 'Q', img);
        expectClean(img);
        expect(guestHash(img)).toBe(h1);
      } finally {
        t.cleanup();
      }
    });
  }
});
