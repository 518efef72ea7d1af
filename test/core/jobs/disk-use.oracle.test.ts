// Disk use after the jobs whose freed clusters QEMU hands back to the file system (its
// discard pass-through defaults), and convert -S 0, which QEMU fully allocates: strata's
// result takes the same room (within 2%) and maps the same as qemu-img's.
import { afterAll, expect, it } from 'vitest';
import { describeOracle, qemuImg, qemuIo, tempDir } from '../../oracle/qemu';
import { allocatedBytes, expectClean, expectSameContent, qemuMap, strataOk } from './helpers';

/** The same job by qemu-img and by strata on identical copies: [strata's file, qemu's file]. */
async function both(t: ReturnType<typeof tempDir>, name: string, make: (dir: (f: string) => string) => void,
  run: (tool: 'strata' | 'qemu', dir: (f: string) => string) => Promise<string>): Promise<[string, string]> {
  const out: string[] = [];
  for (const tool of ['strata', 'qemu'] as const) {
    const dir = (f: string) => t.path(`${name}-${tool}-${f}`);
    make(dir);
    out.push(await run(tool, dir));
  }
  return out as [string, string];
}

function expectSameRoom(ours: string, theirs: string): void {
  const [a, b] = [allocatedBytes(ours), allocatedBytes(theirs)];
  expect({ ours, a, within: Math.abs(a - b) <= b * 0.02 }).toEqual({ ours, a, within: true });
}

describeOracle('disk use after jobs that free clusters, as qemu-img\'s', () => {
  const t = tempDir('strata-disk-use-');
  afterAll(() => t.cleanup());

  it('commit of an all-zero overlay frees the base\'s clusters (iotest 122)', async () => {
    const [ours, theirs] = await both(t, 'commit', (d) => {
      qemuImg('create', '-q', '-f', 'qcow2', d('base.qcow2'), '16M');
      qemuIo(d('base.qcow2'), ['write -P 1 0 8M']);
      qemuImg('create', '-q', '-f', 'qcow2', '-b', d('base.qcow2'), '-F', 'qcow2', d('top.qcow2'));
      qemuIo(d('top.qcow2'), ['write -z 0 8M']);
    }, async (tool, d) => {
      if (tool === 'strata') await strataOk('commit', d('top.qcow2'));
      else qemuImg('commit', '-q', d('top.qcow2'));
      return d('base.qcow2');
    });
    expectClean(ours);
    expect(qemuMap(ours)).toEqual(qemuMap(theirs));
    expectSameRoom(ours, theirs);
  });

  for (const fmt of ['qcow2', 'raw']) {
    it(`convert -S 0 -O ${fmt} allocates everything, zeros and unallocated areas too (iotest 122)`, async () => {
      const [ours, theirs] = await both(t, `convert-${fmt}`, (d) => {
        qemuImg('create', '-q', '-f', 'qcow2', d('src.qcow2'), '16M');
        qemuIo(d('src.qcow2'), ['write -P 1 0 1M', 'write -z 2M 1M', 'write -P 2 9M 64k']);
      }, async (tool, d) => {
        const out = d(`out.${fmt}`);
        if (tool === 'strata') await strataOk('convert', '-S', '0', '-O', fmt, d('src.qcow2'), out);
        else qemuImg('convert', '-S', '0', '-O', fmt, d('src.qcow2'), out);
        return out;
      });
      if (fmt === 'qcow2') {
        expectClean(ours);
        expect(qemuMap(ours)).toEqual(qemuMap(theirs));
      }
      expectSameContent(ours, theirs);
      expectSameRoom(ours, theirs);
    });
  }

  it('snapshot -d punches the clusters only the snapshot held', async () => {
    const [ours, theirs] = await both(t, 'snapdel', (d) => {
      qemuImg('create', '-q', '-f', 'qcow2', d('img.qcow2'), '16M');
      qemuIo(d('img.qcow2'), ['write -P 1 0 8M']);
      qemuImg('snapshot', '-c', 's1', d('img.qcow2'));
      qemuIo(d('img.qcow2'), ['write -P 2 0 8M']);
      qemuImg('snapshot', '-c', 's2', d('img.qcow2'));
    }, async (tool, d) => {
      if (tool === 'strata') await strataOk('snapshot', '-d', 's1', d('img.qcow2'));
      else qemuImg('snapshot', '-d', 's1', d('img.qcow2'));
      return d('img.qcow2');
    });
    expectClean(ours);
    expectSameRoom(ours, theirs);
  });

  it('snapshot -a punches the clusters only the dropped state held', async () => {
    const [ours, theirs] = await both(t, 'snapapply', (d) => {
      qemuImg('create', '-q', '-f', 'qcow2', d('img.qcow2'), '16M');
      qemuIo(d('img.qcow2'), ['write -P 1 0 4M']);
      qemuImg('snapshot', '-c', 's1', d('img.qcow2'));
      qemuIo(d('img.qcow2'), ['write -P 2 0 8M']);
    }, async (tool, d) => {
      if (tool === 'strata') await strataOk('snapshot', '-a', 's1', d('img.qcow2'));
      else qemuImg('snapshot', '-a', 's1', d('img.qcow2'));
      return d('img.qcow2');
    });
    expectClean(ours);
    expectSameContent(ours, theirs);
    expectSameRoom(ours, theirs);
  });
});
