// The CLI on qcow2 images with an external data file, against qemu-img 7.2: info (human and
// JSON: "data file", "data file raw"), map (offsets in the data file, named in the File
// column) and check print what qemu-img prints; info opens no data file; a missing data file
// or a cleared name is one line naming both files (qemu-img's text under its name); a relative
// name is relative to the working directory, as in QEMU; --image-opts data-file.filename=
// gives another data file; the data file is locked as the image is.
import { spawnSync } from 'node:child_process';
import { readFileSync, renameSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, expect, it } from 'vitest';
import { asQemuImg, ensureBuilt, repoRoot, strata } from './run-cli';
import { describeOracleText, qemuImg, qemuImgRun, qemuIo, tempDir } from '../oracle/qemu';
import { lockBytes, poll, startHolder } from '../oracle/holders';
import { closeChain, openImage } from '../../core/chain/open';

const t = tempDir('strata-data-file-cli-');
afterAll(() => t.cleanup());

describeOracleText('external data files through the CLI', () => {
  const img = t.path('img.qcow2');
  const data = t.path('img.data');
  const raw = t.path('raw.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', '-o', `data_file=${data}`, img, '4M');
  qemuIo(img, ['write -P 1 0 64k', 'write -P 2 192k 200k', 'write -z 1M 64k']);
  qemuImg('create', '-q', '-f', 'qcow2', '-o', `data_file=${t.path('raw.data')},data_file_raw=on`, raw, '1M');

  for (const args of [['info'], ['info', '--output=json'], ['map'], ['map', '--output=json'], ['check'], ['check', '--output=json']]) {
    it(`${args.join(' ')} prints what qemu-img prints`, async () => {
      for (const file of [img, raw]) {
        const q = qemuImgRun(...args, file);
        const s = await asQemuImg(...args, file);
        expect(s.code).toBe(q.status);
        // info's disk size may differ by what the file system allocated for the header writes.
        const norm = (x: string) => x.replace(/disk size: .*|"actual-size": \d+/g, '');
        expect(norm(s.out)).toBe(norm(q.stdout));
      }
    });
  }

  it('info opens no data file; other commands name the missing one in one line', async () => {
    renameSync(data, `${data}.away`);
    try {
      const i = await strata('info', img);
      expect(i.code).toBe(0);
      expect(i.out).toContain(`data file: ${data}`);
      for (const args of [['map', img], ['check', img], ['convert', '-O', 'raw', img, t.path('out.raw')]]) {
        const s = await strata(...args);
        expect(s.code).not.toBe(0);
        expect(s.err).toBe(`strata: ${img}: its external data file '${data}' does not exist (a relative name is taken from the working directory; fix the name with \`strata amend -o data_file=PATH\`)\n`);
        const q = await asQemuImg(...args);
        expect(q.err).toBe(qemuImgRun(...args).stderr);
      }
    } finally {
      renameSync(`${data}.away`, data);
    }
  });

  it('a cleared name needs data-file.filename, as in QEMU; --image-opts gives it', async () => {
    const c = t.path('cleared.qcow2');
    const cd = t.path('cleared.data');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', `data_file=${cd}`, c, '1M');
    qemuIo(c, ['write -P 7 0 64k']);
    qemuImg('amend', '-o', 'data_file=', c);
    const q = qemuImgRun('map', c);
    const s = await asQemuImg('map', c);
    expect(s.err).toBe(q.stderr);
    expect(s.err).toBe(`qemu-img: Could not open '${c}': 'data-file' is required for this image\n`);
    expect((await strata('map', c)).err).toMatch(/records no name for it/);
    const opts = `data-file.filename=${cd},file.filename=${c}`;
    for (const args of [['map', '--output=json'], ['info', '--output=json'], ['check']]) {
      const a = await asQemuImg(...args, '--image-opts', opts);
      const b = qemuImgRun(...args, '--image-opts', opts);
      expect(a.code).toBe(b.status);
      expect(a.out.replace(/"actual-size": \d+/, '')).toBe(b.stdout.replace(/"actual-size": \d+/, ''));
    }
    const conv = t.path('cleared.raw');
    expect((await strata('convert', '-O', 'raw', '--image-opts', opts, conv)).code).toBe(0);
    expect(readFileSync(conv).subarray(0, 65536).every((x) => x === 7)).toBe(true);
    // A data file given to an image without one is refused, as by QEMU.
    const plain = t.path('plain.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', plain, '1M');
    const p = await asQemuImg('map', '--image-opts', `data-file.filename=${cd},file.filename=${plain}`);
    expect(p.err).toBe(`qemu-img: Could not open '${plain}': 'data-file' can only be set for images with an external data file\n`);
    // Drivers Strata does not open are refused in one line.
    const n = await strata('map', `json:{"driver":"qcow2","file":{"filename":"${c}"},"data-file":{"driver":"null-co"}}`);
    expect(n.code).not.toBe(0);
    expect(n.err).toMatch(/'null-co' driver/);
  });

  it('a relative data file name is taken from the working directory, as by qemu-img', () => {
    ensureBuilt();
    const dir = t.path('rel');
    spawnSync('mkdir', ['-p', dir]);
    const bin = join(repoRoot, 'bin', 'strata.cjs');
    const run = (cwd: string, ...args: string[]) => spawnSync(process.execPath, [bin, ...args], { cwd, encoding: 'utf8' });
    expect(run(dir, 'create', '-q', '-f', 'qcow2', '-o', 'data_file=rel.data', 'rel.qcow2', '1M').status).toBe(0);
    expect(run(dir, 'io', '-c', 'write -P 9 0 4k', 'rel.qcow2').status).toBe(0);
    expect(readFileSync(join(dir, 'rel.data')).subarray(0, 4096).every((x) => x === 9)).toBe(true);
    expect(spawnSync('qemu-img', ['check', 'rel.qcow2'], { cwd: dir }).status).toBe(0);
    // From elsewhere the name leads nowhere, for qemu-img and for strata.
    const q = spawnSync('qemu-img', ['map', join(dir, 'rel.qcow2')], { cwd: t.dir, encoding: 'utf8' });
    const s = run(t.dir, 'map', join(dir, 'rel.qcow2'));
    expect(q.status).not.toBe(0);
    expect(s.status).not.toBe(0);
    expect(s.stderr).toContain("its external data file 'rel.data' does not exist");
  });

  it('the data file is locked as QEMU locks it: the same lock bytes as qemu-io, read-only and writable', async () => {
    for (const writable of [false, true]) {
      const holder = await startHolder('qemu-io', img, t.path('sock'), { readOnly: !writable });
      let theirs: number[];
      try {
        await poll(() => lockBytes(holder.pid, data).length > 0, 15_000, 'qemu-io to lock the data file');
        theirs = lockBytes(holder.pid, data);
        // A writer on the image keeps our writes out (and names the image).
        if (writable) {
          const s = await strata('io', '-c', 'write -P 5 0 4k', img);
          expect(s.code).not.toBe(0);
          expect(s.err).toMatch(/in use/);
        }
      } finally {
        await holder.stop();
      }
      const ours = await openImage(img, { writable });
      try {
        expect(lockBytes(process.pid, data)).toStrictEqual(theirs);
      } finally {
        await closeChain(ours);
      }
    }
  });
});
