// qcow2's legacy AES encryption (crypt_method 1) against qemu-img and qemu-io: images QEMU
// encrypts read the same through Strata, images Strata creates and writes read the same through
// QEMU (which checks them clean), info/map/check print what qemu-img prints, and what cannot
// be done (no key, a format that is not the image's, compression) is refused in one line with nothing written.
import { execFileSync } from 'node:child_process';
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import { afterAll, describe, expect, it } from 'vitest';
import { describeOracle, qemuImg, qemuImgRun, tempDir } from '../oracle/qemu';
import { asQemuImg, sha256, strata } from './run-cli';
import { AesCipher } from '../../core/engine/aes';

const SECRET = 'astrochicken';
const OBJ = `secret,id=sec0,data=${SECRET}`;

/** The --image-opts string for an AES image keyed by sec0 (and its backing file's, with `backing`). */
const opts = (file: string, backing?: string) =>
  `driver=qcow2,file.filename=${file},encrypt.key-secret=sec0${backing ? `,backing.driver=qcow2,backing.file.filename=${backing},backing.encrypt.key-secret=sec0` : ''}`;
/** The same as a json: name. */
const json = (file: string, backing?: string) =>
  `json:${JSON.stringify({ driver: 'qcow2', file: { filename: file }, 'encrypt.key-secret': 'sec0', ...(backing ? { backing: { driver: 'qcow2', file: { filename: backing }, encrypt: { 'key-secret': 'sec0' } } } : {}) })}`;

function qemuIoEnc(spec: string, cmds: string[], object = OBJ): string {
  const args = ['--object', object, '--image-opts'];
  for (const c of cmds) args.push('-c', c);
  args.push(spec);
  const out = execFileSync('qemu-io', args, { encoding: 'utf8', maxBuffer: 64 << 20 });
  if (/error|failed/i.test(out)) throw new Error(`qemu-io ${cmds.join('; ')}: ${out}`);
  return out;
}

/** The guest content as qemu-img reads it (decrypted with the secret), as a raw file's bytes. */
function qemuRaw(spec: string, out: string): Buffer {
  qemuImg('convert', '--object', OBJ, '--image-opts', spec, '-O', 'raw', out);
  return readFileSync(out);
}

describe('AES cipher', () => {
  it('keys with the secret up to its first NUL, cut at 16 bytes, and round-trips whole sectors', () => {
    const data = Buffer.alloc(2048);
    for (let i = 0; i < data.length; i++) data[i] = (i * 7) & 0xff;
    const enc = (secret: string, off: number) => { const b = Buffer.from(data); new AesCipher(Buffer.from(secret)).encrypt(b, off); return b; };
    const a = enc('0123456789abcdefXYZ', 4096);
    expect(a).toStrictEqual(enc('0123456789abcdef', 4096));
    expect(enc('abc\0def', 0)).toStrictEqual(enc('abc', 0));
    expect(a).not.toStrictEqual(data);
    // The IV is the guest sector: the same bytes elsewhere encrypt differently.
    expect(a).not.toStrictEqual(enc('0123456789abcdef', 8192));
    new AesCipher(Buffer.from('0123456789abcdef')).decrypt(a, 4096);
    expect(a).toStrictEqual(data);
    expect(() => new AesCipher(Buffer.from('k')).encrypt(Buffer.alloc(100), 0)).toThrow(/whole/);
  });
});

describeOracle('AES-encrypted qcow2 (as qemu-img)', () => {
  const t = tempDir('strata-aes-');
  afterAll(() => t.cleanup());

  // QEMU's images: a base written whole, an encrypted overlay written in part (copy-on-write
  // from the base), writes at unaligned offsets and across clusters, and zeroed ranges.
  const base = t.path('base.qcow2');
  const top = t.path('top.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', '--object', OBJ, '-o', 'encryption=on,encrypt.key-secret=sec0,cluster_size=4k', base, '1M');
  qemuIoEnc(opts(base), ['write -P 0xa 0 512k', 'write -P 0xb 700000 100000', 'write -z 200k 64k']);
  qemuImg('create', '-q', '-f', 'qcow2', '--object', OBJ, '-o', 'encrypt.format=aes,encrypt.key-secret=sec0', '-b', base, '-F', 'qcow2', top, '1M');
  qemuIoEnc(opts(top, base), ['write -P 0xe 1000 3000', 'write -P 0xf 65000 70000', 'write -z 600k 4k']);

  it('an image QEMU encrypted reads the same through strata convert (and a chain of two)', async () => {
    const want = qemuRaw(opts(top, base), t.path('want.raw'));
    const r = await strata('convert', '--object', OBJ, '-O', 'raw', '--image-opts', opts(top, base), t.path('got.raw'));
    expect(r.err).toBe('');
    expect(r.code).toBe(0);
    expect(readFileSync(t.path('got.raw'))).toStrictEqual(want);
    const r2 = await strata('convert', '--object', OBJ, '-O', 'raw', json(base), t.path('got-base.raw'));
    expect(r2.code).toBe(0);
    expect(readFileSync(t.path('got-base.raw'))).toStrictEqual(qemuRaw(opts(base), t.path('want-base.raw')));
    // strata io reads the patterns qemu-io wrote, at unaligned offsets.
    const io = await strata('io', '--object', OBJ, '-c', 'read -P 0xe 1000 3000', '-c', 'read -P 0xf 65000 70000', '-c', 'read -P 0xa 4000 1000', json(top, base));
    expect(io.code).toBe(0);
    expect(io.out).not.toMatch(/fail/i);
  });

  it('create -o encryption=on (and encrypt.format=aes, compat=0.10) lays out the bytes qemu-img does', async () => {
    for (const o of ['encryption=on,encrypt.key-secret=sec0', 'encrypt.format=aes,encrypt.key-secret=sec0,cluster_size=16k', 'encryption=on,encrypt.key-secret=sec0,compat=0.10']) {
      const s = t.path('s-create.qcow2');
      const q = t.path('q-create.qcow2');
      const r = await strata('create', '-f', 'qcow2', '--object', OBJ, '-o', o, s, '4M');
      expect(r.code).toBe(0);
      const qo = qemuImg('create', '-f', 'qcow2', '--object', OBJ, '-o', o, q, '4M');
      expect(r.out).toBe(qo.replace(q, s));
      expect(readFileSync(s)).toStrictEqual(readFileSync(q));
    }
  });

  it('strata writes that qemu-io reads back and qemu-img checks clean, copy-on-write from an encrypted base included', async () => {
    const s = t.path('s-top.qcow2');
    const r0 = await strata('create', '-q', '-f', 'qcow2', '--object', OBJ, '-o', 'encryption=on,encrypt.key-secret=sec0', '-b', base, '-F', 'qcow2', s, '1M');
    expect(r0.code).toBe(0);
    const q = t.path('q-top.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '--object', OBJ, '-o', 'encryption=on,encrypt.key-secret=sec0', '-b', base, '-F', 'qcow2', q, '1M');
    const cmds = ['write -P 0x11 100 200', 'write -P 0x22 65000 70000', 'write -P 0x33 500000 1', 'write -z 4096 8192', 'write -P 0x44 999999 49'];
    const w = await strata('io', '--object', OBJ, ...cmds.flatMap((c) => ['-c', c]), json(s, base));
    expect(w.code).toBe(0);
    qemuIoEnc(opts(q, base), cmds);
    expect(qemuRaw(opts(s, base), t.path('s-top.raw'))).toStrictEqual(qemuRaw(opts(q, base), t.path('q-top.raw')));
    const c = qemuImgRun('check', '--object', OBJ, '--image-opts', opts(s, base));
    expect(c.stdout).toContain('No errors were found on the image.');
    expect(c.status).toBe(0);
    // The same clusters as qemu-io's writes, as qemu-img maps them.
    const m = (f: string) => JSON.parse(qemuImg('map', '--output=json', '--object', OBJ, '--image-opts', opts(f, base)));
    expect(m(s)).toStrictEqual(m(q));
  });

  it('partial writes to extended L2 subclusters and to clusters a snapshot shares read back as qemu-io\'s', async () => {
    const cmds = ['write -P 1 100 3000', 'write -P 2 5000 10', 'write -z 8192 2048', 'write -P 3 60000 10000', 'write -P 4 2100 5'];
    for (const extra of ['extended_l2=on,cluster_size=64k', 'cluster_size=4k']) {
      const s = t.path('s-sub.qcow2');
      const q = t.path('q-sub.qcow2');
      for (const f of [s, q]) {
        qemuImg('create', '-q', '-f', 'qcow2', '--object', OBJ, '-o', `encryption=on,encrypt.key-secret=sec0,${extra}`, f, '1M');
        qemuIoEnc(opts(f), ['write -P 9 0 128k']);
        // A snapshot shares the clusters: the writes below copy them first.
        qemuImg('snapshot', '--object', OBJ, '-c', 'snap', '--image-opts', opts(f));
      }
      const w = await strata('io', '--object', OBJ, ...cmds.flatMap((c) => ['-c', c]), json(s));
      expect(w.code).toBe(0);
      qemuIoEnc(opts(q), cmds);
      expect(qemuRaw(opts(s), t.path('s-sub.raw'))).toStrictEqual(qemuRaw(opts(q), t.path('q-sub.raw')));
      expect(qemuImgRun('check', '--object', OBJ, '--image-opts', opts(s)).status).toBe(0);
      // The snapshot still reads what it held.
      qemuImg('snapshot', '--object', OBJ, '-a', 'snap', '--image-opts', opts(s));
      expect(qemuIoEnc(opts(s), ['read -P 9 0 128k'])).not.toMatch(/fail/i);
    }
  });

  it('convert to and from encrypted images: qemu-img reads the target as the source', async () => {
    const src = t.path('plain.raw');
    const buf = Buffer.alloc(1 << 20);
    for (let i = 0; i < buf.length; i += 4096) buf.fill((i >> 12) & 0xff, i, i + 1000 + (i % 3000));
    writeFileSync(src, buf);
    const enc = t.path('conv.qcow2');
    const r = await strata('convert', '--object', OBJ, '-O', 'qcow2', '-o', 'encryption=on,encrypt.key-secret=sec0', src, enc);
    expect(r.err).toBe('');
    expect(r.code).toBe(0);
    expect(qemuRaw(opts(enc), t.path('conv-back.raw'))).toStrictEqual(buf);
    expect(qemuImgRun('check', '--object', OBJ, '--image-opts', opts(enc)).status).toBe(0);
    // The encrypted image's clusters hold no plaintext.
    expect(readFileSync(enc).includes(buf.subarray(4096, 4096 + 1000))).toBe(false);
    // And back, compressed (the source is encrypted, the target is not).
    const back = t.path('conv-back.qcow2');
    const r2 = await strata('convert', '--object', OBJ, '-c', '-O', 'qcow2', '--image-opts', opts(enc), back);
    expect(r2.code).toBe(0);
    expect(qemuImgRun('compare', src, back).status).toBe(0);
  });

  it('info (human and JSON) prints what qemu-img prints, without the key as with it', async () => {
    for (const args of [[top], ['--output=json', top], ['--output=json', '--backing-chain', top]]) {
      const q = qemuImgRun('info', ...args);
      const r = await asQemuImg('info', ...args);
      expect(r.code).toBe(q.status);
      expect(r.out).toBe(q.stdout);
    }
    expect((await strata('info', top)).out).toContain('encrypted: yes');
    const withKey = await strata('info', '--output=json', '--object', OBJ, '--image-opts', opts(top));
    expect(JSON.parse(withKey.out).encrypted).toBe(true);
    // info opens without I/O: the key is not looked up, so an unknown secret id does not matter.
    const spec = `driver=qcow2,file.filename=${top},encrypt.key-secret=nosuch`;
    expect(qemuImgRun('info', '--object', OBJ, '--image-opts', spec).status).toBe(0);
    expect((await strata('info', '--object', OBJ, '--image-opts', spec)).code).toBe(0);
  });

  it('map and check with the key print what qemu-img prints; the human map refuses as qemu-img does', async () => {
    const q = qemuImgRun('map', '--output=json', '--object', OBJ, '--image-opts', opts(top, base));
    const r = await asQemuImg('map', '--output=json', '--object', OBJ, '--image-opts', opts(top, base));
    expect(r.code).toBe(0);
    expect(r.out).toBe(q.stdout);
    const qh = qemuImgRun('map', '--object', OBJ, '--image-opts', opts(top, base));
    const rh = await asQemuImg('map', '--object', OBJ, '--image-opts', opts(top, base));
    expect(rh.code).toBe(qh.status);
    expect(rh.out).toBe(qh.stdout);
    expect(rh.err).toBe(qh.stderr);
    const qc = qemuImgRun('check', '--output=json', '--object', OBJ, '--image-opts', opts(top, base));
    const rc = await asQemuImg('check', '--output=json', '--object', OBJ, '--image-opts', opts(top, base));
    expect(rc.code).toBe(0);
    expect(rc.code).toBe(qc.status);
    expect(JSON.parse(rc.out)).toStrictEqual(JSON.parse(qc.stdout));
  });

  it('without the key, or with an unknown secret id, reads are refused in one line, as by qemu-img', async () => {
    const before = await sha256(top);
    for (const cmd of [['map', top], ['check', top], ['convert', '-O', 'raw', top, t.path('nokey.raw')]]) {
      const q = qemuImgRun(...cmd);
      const r = await asQemuImg(...cmd);
      expect(r.code).toBe(q.status);
      expect(r.code).not.toBe(0);
      expect(r.err).toBe(q.stderr);
      const s = await strata(...cmd);
      expect(s.code).not.toBe(0);
      expect(s.err.trim().split('\n')).toHaveLength(1);
      expect(s.err).toMatch(/encrypted.*key-secret/);
    }
    const io = await strata('io', '-c', 'write -P 1 0 512', top);
    expect(io.code).not.toBe(0);
    expect(io.err.trim().split('\n')).toHaveLength(1);
    const wrongId = ['map', '--output=json', '--object', OBJ, '--image-opts', `driver=qcow2,file.filename=${top},encrypt.key-secret=nosuch`];
    const r = await asQemuImg(...wrongId);
    expect(r.code).toBe(1);
    expect(r.err).toBe(`qemu-img: Could not open '${top}': No secret with id 'nosuch'\n`);
    expect(await sha256(top)).toBe(before);
  });

  it('a wrong key reads garbage, as with qemu-io (the format cannot tell)', async () => {
    const r = await strata('io', '--object', 'secret,id=sec0,data=platypus', '-c', 'read -P 0xa 0 4096', json(base));
    // As qemu-io: the read succeeds, the pattern does not match (exit status 1).
    expect(r.code).toBe(1);
    expect(r.out).toContain('Pattern verification failed');
  });

  it('create refuses what qemu-img refuses, after its Formatting line, and writes nothing', async () => {
    const p = t.path('refused.qcow2');
    const cases: string[][] = [
      ['-o', 'encryption=on'],
      ['-o', 'encryption=on,encrypt.key-secret=nosuch'],
      ['-o', 'encryption=on,encrypt.format=aes,encrypt.key-secret=sec0'],
      ['-o', 'encrypt.key-secret=sec0'],
      ['-o', 'encrypt.format=foo,encrypt.key-secret=sec0'],
      ['-o', 'encrypt.format=aes,encrypt.key-secret=sec0,encrypt.cipher-alg=aes-128'],
    ];
    for (const c of cases) {
      const q = qemuImgRun('create', '-f', 'qcow2', '--object', OBJ, ...c, p, '1M');
      const r = await asQemuImg('create', '-f', 'qcow2', '--object', OBJ, ...c, p, '1M');
      expect(r.code).toBe(q.status);
      expect(r.code).toBe(1);
      expect(r.out).toBe(q.stdout);
      expect(r.err).toBe(q.stderr);
      expect(qemuImgRun('info', p).status).not.toBe(0);
    }
    const raw = await asQemuImg('create', '-f', 'raw', '-o', 'encryption=on', t.path('x.raw'), '1M');
    expect(raw.err).toBe(qemuImgRun('create', '-f', 'raw', '-o', 'encryption=on', t.path('x.raw'), '1M').stderr);
  });

  it('compression and encryption together are refused (convert -c, compressed writes), as by qemu-img', async () => {
    const src = t.path('c-src.raw');
    writeFileSync(src, Buffer.alloc(65536, 1));
    const args = ['convert', '-c', '-O', 'qcow2', '--object', OBJ, '-o', 'encryption=on,encrypt.key-secret=sec0', src, t.path('c.qcow2')];
    const q = qemuImgRun(...args);
    const r = await asQemuImg(...args);
    expect(r.code).toBe(1);
    expect(r.err).toBe(q.stderr);
    const copy = t.path('c-copy.qcow2');
    copyFileSync(base, copy);
    const before = await sha256(copy);
    const w = await strata('io', '--object', OBJ, '-c', 'write -c -P 1 0 4096', json(copy));
    expect(w.out + w.err).toMatch(/compressed clusters cannot be written to an encrypted image/);
    expect(await sha256(copy)).toBe(before);
    const cp = await strata('compact', copy);
    expect(cp.code).not.toBe(0);
    expect(cp.err.trim().split('\n')).toHaveLength(1);
  });

  it('a LUKS image is refused by encrypt.format=aes in one line (LUKS itself: luks.oracle.test.ts)', async () => {
    const luks = t.path('luks.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '--object', OBJ, '-o', 'encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10', luks, '1M');
    const r = await strata('convert', '--object', OBJ, '-O', 'raw', '--image-opts', `${opts(luks)},encrypt.format=aes`, t.path('luks.raw'));
    expect(r.code).not.toBe(0);
    expect(r.err.trim().split('\n')).toHaveLength(1);
    expect(r.err).toMatch(/encrypted with LUKS, but encrypt.format=aes/);
  });

  it('--object takes file= and format=base64, and refuses what qemu-img refuses', async () => {
    const keyFile = t.path('key.txt');
    writeFileSync(keyFile, SECRET);
    const b64 = Buffer.from(SECRET).toString('base64');
    for (const obj of [`secret,id=sec0,file=${keyFile}`, `secret,id=sec0,data=${b64},format=base64`]) {
      const r = await strata('io', '--object', obj, '-c', 'read -P 0xa 0 4096', json(base));
      expect(r.code).toBe(0);
      expect(r.out).not.toMatch(/fail/i);
    }
    for (const obj of ['secret,data=x', 'foo,id=a', 'secret,id=a', 'secret,id=a,data=x,bogus=1']) {
      const q = qemuImgRun('info', '--object', obj, base);
      const r = await asQemuImg('info', '--object', obj, base);
      expect(r.code).toBe(1);
      expect(r.err).toBe(q.stderr);
    }
  });
});
