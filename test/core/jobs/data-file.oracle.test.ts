// Jobs on qcow2 images with an external data file (data_file=), against qemu-img 7.2: create
// lays the image file out byte for byte as qemu-img does for every preallocation (the data
// file as long as the disk, allocated for falloc and full), its refusals are qemu-img's; amend
// changes the recorded name and the raw flag as qemu-img does; resize, commit, rebase and
// convert go through the data file and leave images that qemu-img checks clean.
import { copyFileSync, readFileSync, statSync } from 'node:fs';
import { afterAll, expect, it } from 'vitest';
import { asQemuImg, strata, strataOk } from '../../cli/run-cli';
import { describeOracleText, qemuImg, qemuImgRun, qemuIo, tempDir } from '../../oracle/qemu';

const t = tempDir('strata-data-file-');
afterAll(() => t.cleanup());

function same(a: string, b: string): boolean {
  return readFileSync(a).equals(readFileSync(b));
}

describeOracleText('external data files: create, amend, resize, commit, convert', () => {
  for (const opts of ['', 'preallocation=metadata', 'preallocation=falloc', 'preallocation=full', 'data_file_raw=on', 'cluster_size=16384,extended_l2=on,lazy_refcounts=on', 'preallocation=metadata,cluster_size=512']) {
    it(`create -o data_file=...${opts ? ',' + opts : ''}: the image file is qemu-img's, the data file as long and as allocated`, async () => {
      const img = t.path('c.qcow2');
      const data = t.path('c.data');
      const o = [`data_file=${data}`, ...(opts ? [opts] : [])].join(',');
      const q = qemuImg('create', '-f', 'qcow2', '-o', o, img, '5M');
      copyFileSync(img, t.path('q.qcow2'));
      const qData = statSync(data);
      const s = await strata('create', '-f', 'qcow2', '-o', o, img, '5M');
      expect(s.code, s.err).toBe(0);
      expect(s.out).toBe(q);
      expect(same(img, t.path('q.qcow2'))).toBe(true);
      const sData = statSync(data);
      expect(sData.size).toBe(qData.size);
      // falloc and full allocate the data file; off and metadata leave it sparse but for its
      // first block, which QEMU's file driver writes.
      expect(sData.blocks).toBe(qData.blocks);
      expect(qemuImgRun('check', img).status).toBe(0);
    });
  }

  it('create refuses what qemu-img refuses, in its words, and writes nothing', async () => {
    const img = t.path('r.qcow2');
    const cases: [string[], string][] = [
      [['-o', `data_file=${t.path('r.data')},compat=0.10`], 'External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)'],
      [['-o', 'data_file_raw=on'], 'data-file-raw requires data-file'],
      [['-o', `data_file=${t.path('r.data')},data_file_raw=on`, '-b', t.path('c.qcow2'), '-F', 'qcow2'], 'Backing file and data-file-raw cannot be used at the same time'],
    ];
    for (const [args, text] of cases) {
      const q = qemuImgRun('create', '-f', 'qcow2', ...args, img, '1M');
      const s = await asQemuImg('create', '-f', 'qcow2', ...args, img, '1M');
      expect(q.stderr).toContain(text);
      expect(s.code).toBe(q.status);
      expect(s.err).toBe(q.stderr);
    }
    const raw = await asQemuImg('create', '-f', 'raw', '-o', `data_file=${t.path('x')}`, t.path('r.raw'), '1M');
    expect(raw.code).toBe(1);
  });

  it('amend data_file=NAME, data_file= and data_file_raw=off change the header as qemu-img amend does', async () => {
    const img = t.path('a.qcow2');
    const data = t.path('a.data');
    for (const o of [`data_file=${t.path('other.data')}`, 'data_file=', 'data_file_raw=off']) {
      qemuImg('create', '-q', '-f', 'qcow2', '-o', `data_file=${data},data_file_raw=on`, img, '4M');
      qemuImg('amend', '-o', o, img);
      copyFileSync(img, t.path('qa.qcow2'));
      qemuImg('create', '-q', '-f', 'qcow2', '-o', `data_file=${data},data_file_raw=on`, img, '4M');
      await strataOk('amend', '-o', o, img);
      expect(same(img, t.path('qa.qcow2')), o).toBe(true);
    }
    // data_file_raw=on cannot be set again, data_file cannot be given to an image without one.
    const r = await asQemuImg('amend', '-o', 'data_file_raw=on', img);
    expect(r.err).toBe(qemuImgRun('amend', '-o', 'data_file_raw=on', img).stderr);
    qemuImg('create', '-q', '-f', 'qcow2', t.path('plain.qcow2'), '1M');
    const p = await asQemuImg('amend', '-o', 'data_file=foo', t.path('plain.qcow2'));
    expect(p.err).toBe('qemu-img: data-file can only be set for images that use an external data file\n');
    const d = await asQemuImg('amend', '-o', 'compat=0.10', img);
    expect(d.err).toBe('qemu-img: Cannot downgrade an image with a data file\n');
  });

  it('resize grows and shrinks the data file with the image; a raw data file gets its new clusters mapped', async () => {
    for (const raw of [false, true]) {
      const img = t.path('z.qcow2');
      const data = t.path('z.data');
      qemuImg('create', '-q', '-f', 'qcow2', '-o', `data_file=${data}${raw ? ',data_file_raw=on' : ''}`, img, '1M');
      qemuIo(img, ['write -P 3 0 1M']);
      await strataOk('resize', img, '3M');
      expect(statSync(data).size).toBe(3 << 20);
      expect(qemuImgRun('check', img).status).toBe(0);
      if (raw) expect(qemuImg('map', '--output=json', img).trim()).toBe('[{ "start": 0, "length": 3145728, "depth": 0, "present": true, "zero": false, "data": true, "offset": 0}]');
      await strataOk('resize', '--shrink', img, '512K');
      expect(statSync(data).size).toBe(512 << 10);
      expect(qemuImgRun('check', img).status).toBe(0);
      expect(qemuIo(img, ['read -P 3 0 512k'])).not.toContain('Pattern verification failed');
    }
  });

  it('commit into a base with a data file, from an overlay with one; rebase and convert through them', async () => {
    const base = t.path('base.qcow2');
    const ov = t.path('ov.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', `data_file=${t.path('base.data')}`, base, '2M');
    qemuIo(base, ['write -P 1 0 2M']);
    qemuImg('create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', '-o', `data_file=${t.path('ov.data')}`, ov);
    qemuIo(ov, ['write -P 2 100k 300k', 'write -z 1M 64k']);
    const expected = t.path('expected.raw');
    qemuImg('convert', '-O', 'raw', ov, expected);
    // convert -o data_file: the target's data in its data file.
    const conv = t.path('conv.qcow2');
    await strataOk('convert', '-O', 'qcow2', '-o', `data_file=${t.path('conv.data')}`, ov, conv);
    expect(qemuImg('compare', conv, expected)).toContain('Images are identical');
    expect(qemuImg('info', conv)).toContain(`data file: ${t.path('conv.data')}`);
    const c = await asQemuImg('convert', '-c', '-O', 'qcow2', '-o', `data_file=${t.path('c2.data')}`, ov, t.path('c2.qcow2'));
    expect(c.err).toBe('qemu-img: error while writing at byte 0: Operation not supported\n');
    // rebase onto an empty base keeps the content (copied into the overlay's data file).
    const nb = t.path('nb.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', nb, '2M');
    await strataOk('rebase', '-b', nb, '-F', 'qcow2', ov);
    expect(qemuImg('compare', ov, expected)).toContain('Images are identical');
    expect(qemuImgRun('check', ov).status).toBe(0);
    await strataOk('rebase', '-u', '-b', base, '-F', 'qcow2', ov);
    // commit: the base's data file gets the overlay's data, the overlay is emptied.
    await strataOk('commit', ov);
    expect(qemuImg('compare', base, expected)).toContain('Images are identical');
    expect(qemuImg('compare', ov, expected)).toContain('Images are identical');
    expect(qemuImgRun('check', base).status).toBe(0);
    expect(qemuImgRun('check', ov).status).toBe(0);
  });

  it('snapshot -c is refused with an external data file, as by qemu-img', async () => {
    const img = t.path('s.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', `data_file=${t.path('s.data')}`, img, '1M');
    const before = readFileSync(img);
    const s = await asQemuImg('snapshot', '-c', 'x', img);
    const q = qemuImgRun('snapshot', '-c', 'x', img);
    expect(s.code).toBe(q.status);
    expect(s.err).toBe(q.stderr);
    expect(same(img, img) && readFileSync(img).equals(before)).toBe(true);
  });
});
