// LUKS encryption inside qcow2 (crypt_method 2) against qemu-img and qemu-io: images QEMU
// encrypts read the same through Strata, images Strata creates and writes read the same through
// QEMU (which checks them clean), info prints what qemu-img prints (its random fields aside),
// and a wrong or missing key is refused in one line with nothing written.
import { execFileSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { afterAll, describe, expect, it } from 'vitest';
import { describeOracle, qemuImg, qemuImgRun, tempDir } from '../oracle/qemu';
import { sha256, strata } from './run-cli';
import { afMerge, afSplit, createLuks, decodeLuksHeader, encodeLuksHeader, LuksCipher, headerCipherSpec } from '../../core/engine/luks';

const SECRET = 'astrochicken';
const OBJ = `secret,id=sec0,data=${SECRET}`;
const OBJ1 = 'secret,id=sec1,data=furby';
const LUKS = 'encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10';

const opts = (file: string, key = 'sec0', backing?: string, backingKey = 'sec0') =>
  `driver=qcow2,file.filename=${file},encrypt.key-secret=${key}${backing ? `,backing.driver=qcow2,backing.file.filename=${backing},backing.encrypt.key-secret=${backingKey}` : ''}`;
const json = (file: string, key = 'sec0') => `json:${JSON.stringify({ driver: 'qcow2', file: { filename: file }, 'encrypt.key-secret': key })}`;

/**
 * qemu-img create of a LUKS image. QEMU times PBKDF2 by CPU time and gives up now and then on
 * a busy machine ("Unable to get accurate CPU usage"): it is retried then.
 */
function qemuCreate(...args: string[]): string {
  for (let i = 0; ; i++) {
    try {
      return qemuImg('create', ...args);
    } catch (err) {
      if (i >= 4 || !/accurate CPU usage/.test(String(err))) throw err;
    }
  }
}

function qemuIo(spec: string, cmds: string[], objects = [OBJ]): string {
  const args = [...objects.flatMap((o) => ['--object', o]), '--image-opts'];
  for (const c of cmds) args.push('-c', c);
  args.push(spec);
  const out = execFileSync('qemu-io', args, { encoding: 'utf8', maxBuffer: 64 << 20 });
  if (/error|failed/i.test(out)) throw new Error(`qemu-io ${cmds.join('; ')}: ${out}`);
  return out;
}

function qemuRaw(spec: string, out: string, objects = [OBJ]): Buffer {
  qemuImg('convert', ...objects.flatMap((o) => ['--object', o]), '--image-opts', spec, '-O', 'raw', out);
  return readFileSync(out);
}

/** qemu-img info's output without what is random per image (uuid, PBKDF2 iterations). */
const unrandom = (s: string) => s.replace(/("?uuid"?: "?)[0-9a-f-]{36}/g, '$1U').replace(/("?(master[ -]key[ -])?iters"?: )\d+/g, '$1N').replace(/(disk size|"actual-size"): .*/g, '');

describe('LUKS engine', () => {
  it('the anti-forensic split merges back to the key, and a header round-trips', () => {
    const key = Buffer.from('00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff', 'hex');
    for (const hash of ['sha256', 'sha1', 'sha512']) {
      const split = afSplit(hash, key, 4000);
      expect(split.length).toBe(key.length * 4000);
      expect(afMerge(hash, split, key.length, 4000)).toStrictEqual(key);
      split[7]! ^= 1;
      expect(afMerge(hash, split, key.length, 4000)).not.toStrictEqual(key);
    }
    const { area } = createLuks({ iterTime: 1 }, Buffer.from('pw'));
    const h = decodeLuksHeader(area);
    expect(encodeLuksHeader(h)).toStrictEqual(area.subarray(0, 592));
    expect(h.slots.filter((s) => s.active)).toHaveLength(1);
    expect(headerCipherSpec(h)).toMatchObject({ alg: 'aes-256', mode: 'xts', ivgen: 'plain64', hash: 'sha256' });
    expect(area.length).toBe(2068480);
  });

  it('sectors are encrypted by their offset, and must be whole', () => {
    const c = new LuksCipher({ alg: 'aes-256', mode: 'xts', ivgen: 'plain64', hash: 'sha256' }, Buffer.alloc(64, 7).fill(9, 32));
    const data = Buffer.alloc(1024, 0x5a);
    const a = Buffer.from(data);
    c.encrypt(a, 4096);
    expect(a.subarray(0, 512)).not.toStrictEqual(a.subarray(512));
    const b = Buffer.from(a);
    c.decrypt(b, 4096);
    expect(b).toStrictEqual(data);
    c.decrypt(a, 8192);
    expect(a).not.toStrictEqual(data);
    expect(() => c.encrypt(Buffer.alloc(100), 0)).toThrow(/whole/);
  });
});

describeOracle('LUKS-encrypted qcow2 (as qemu-img)', () => {
  const t = tempDir('strata-luks-');
  afterAll(() => t.cleanup());

  const cmds = ['write -P 0x11 100 200', 'write -P 0x22 65000 70000', 'write -P 0x33 500000 1', 'write -z 4096 8192', 'write -P 0x44 999999 49'];

  it('images QEMU encrypted (several ciphers) read the same through strata', async () => {
    for (const extra of ['cluster_size=4k', 'encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha512', 'encrypt.cipher-alg=aes-256,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain']) {
      const q = t.path('q.qcow2');
      qemuCreate('-q', '-f', 'qcow2', '--object', OBJ, '-o', `${LUKS},${extra}`, q, '1M');
      qemuIo(opts(q), cmds);
      const r = await strata('convert', '--object', OBJ, '-O', 'raw', '--image-opts', opts(q), t.path('got.raw'));
      expect(r.err).toBe('');
      expect(r.code).toBe(0);
      expect(readFileSync(t.path('got.raw'))).toStrictEqual(qemuRaw(opts(q), t.path('want.raw')));
      const io = await strata('io', '--object', OBJ, '-c', 'read -P 0x22 65000 70000', '-c', 'read -P 0x11 100 200', json(q));
      expect(io.code).toBe(0);
      expect(io.out).not.toMatch(/fail/i);
    }
  });

  it('strata creates and writes images qemu-io reads back and qemu-img checks clean, laid out as qemu-img lays them', async () => {
    for (const extra of ['cluster_size=512', 'cluster_size=64k', 'encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256']) {
      const s = t.path('s.qcow2');
      const q = t.path('q.qcow2');
      const r = await strata('create', '-q', '-f', 'qcow2', '--object', OBJ, '-o', `${LUKS},${extra}`, s, '1M');
      expect(r.code).toBe(0);
      qemuCreate('-q', '-f', 'qcow2', '--object', OBJ, '-o', `${LUKS},${extra}`, q, '1M');
      expect(readFileSync(s).length).toBe(readFileSync(q).length);
      const w = await strata('io', '--object', OBJ, ...cmds.flatMap((c) => ['-c', c]), json(s));
      expect(w.code).toBe(0);
      qemuIo(opts(q), cmds);
      expect(qemuRaw(opts(s), t.path('s.raw'))).toStrictEqual(qemuRaw(opts(q), t.path('q.raw')));
      const c = qemuImgRun('check', '--object', OBJ, '--image-opts', opts(s));
      expect(c.stdout).toContain('No errors were found on the image.');
      const m = (f: string) => JSON.parse(qemuImg('map', '--output=json', '--object', OBJ, '--image-opts', opts(f)));
      expect(m(s)).toStrictEqual(m(q));
      const sc = await strata('check', '--object', OBJ, '--image-opts', opts(s));
      expect(sc.code).toBe(0);
    }
  });

  it('info prints what qemu-img prints (uuid and iterations aside), text and JSON', async () => {
    const q = t.path('info.qcow2');
    qemuCreate('-q', '-f', 'qcow2', '--object', OBJ, '-o', `${LUKS},encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256`, q, '1M');
    const s = t.path('info-s.qcow2');
    expect((await strata('create', '-q', '-f', 'qcow2', '--object', OBJ, '-o', LUKS, s, '1M')).code).toBe(0);
    for (const f of [q, s]) {
      for (const out of [[], ['--output=json']]) {
        const r = await strata('info', ...out, f);
        expect(r.code).toBe(0);
        expect(unrandom(r.out)).toBe(unrandom(qemuImg('info', ...out, f)));
      }
      // Strata's own uuid and iterations are real ones.
      const bytes = readFileSync(f);
      const h = decodeLuksHeader(bytes.subarray(bytes.indexOf(Buffer.from('LUKS\xba\xbe', 'latin1'))));
      expect(h.uuid).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-/);
      expect(h.slots[0]!.iterations).toBeGreaterThanOrEqual(1000);
    }
  });

  it('a wrong or missing key is refused in one line, and nothing is written', async () => {
    const q = t.path('locked.qcow2');
    qemuCreate('-q', '-f', 'qcow2', '--object', OBJ, '-o', LUKS, q, '1M');
    qemuIo(opts(q), ['write -P 7 0 64k']);
    const before = await sha256(q);
    const wrong = 'secret,id=sec0,data=platypus';
    for (const args of [
      ['io', '--object', wrong, '-c', 'write -P 1 0 512', json(q)],
      ['convert', '--object', wrong, '-O', 'raw', '--image-opts', opts(q), t.path('x.raw')],
      ['check', '--object', wrong, '--image-opts', opts(q)],
      ['io', '-c', 'write -P 1 0 512', q],
      ['io', '--object', OBJ1, '-c', 'write -P 1 0 512', json(q)],
    ]) {
      const r = await strata(...args);
      expect(r.code).not.toBe(0);
      expect(r.err.trim().split('\n')).toHaveLength(1);
      expect(r.err).toContain('locked.qcow2');
    }
    expect((await strata('io', '--object', wrong, '-c', 'read 0 512', json(q))).err).toMatch(/unlocks none of the image's LUKS key slots/);
    expect(await sha256(q)).toBe(before);
  });

  it('convert to and from LUKS images, and a commit between images with different keys', async () => {
    const src = t.path('plain.raw');
    const buf = Buffer.alloc(1 << 20);
    for (let i = 0; i < buf.length; i += 4096) buf.fill((i >> 12) & 0xff, i, i + 1000 + (i % 3000));
    writeFileSync(src, buf);
    const enc = t.path('conv.qcow2');
    for (const extra of ['', ',preallocation=metadata']) {
      const r = await strata('convert', '--object', OBJ, '-O', 'qcow2', '-o', `${LUKS}${extra}`, src, enc);
      expect(r.code).toBe(0);
      expect(qemuRaw(opts(enc), t.path('conv.raw'))).toStrictEqual(buf);
      expect(qemuImgRun('check', '--object', OBJ, '--image-opts', opts(enc)).status).toBe(0);
    }
    const back = await strata('convert', '--object', OBJ, '--image-opts', opts(enc), '-O', 'raw', t.path('back.raw'));
    expect(back.code).toBe(0);
    expect(readFileSync(t.path('back.raw'))).toStrictEqual(buf);
    // An overlay keyed by sec1 over a base keyed by sec0, committed by strata.
    const top = t.path('top.qcow2');
    qemuCreate('-q', '-f', 'qcow2', '--object', OBJ1, '-o', 'encrypt.format=luks,encrypt.key-secret=sec1,encrypt.iter-time=10', '-b', enc, '-F', 'qcow2', top);
    qemuIo(opts(top, 'sec1', enc), ['write -P 0x99 4096 100000'], [OBJ, OBJ1]);
    const want = qemuRaw(opts(top, 'sec1', enc), t.path('want-top.raw'), [OBJ, OBJ1]);
    const c = await strata('commit', '--object', OBJ, '--object', OBJ1, '--image-opts', opts(top, 'sec1', enc));
    expect(c.code).toBe(0);
    expect(qemuRaw(opts(enc), t.path('committed.raw'))).toStrictEqual(want);
    expect(qemuRaw(opts(top, 'sec1', enc), t.path('after.raw'), [OBJ, OBJ1])).toStrictEqual(want);
    expect(qemuImgRun('check', '--object', OBJ, '--object', OBJ1, '--image-opts', opts(top, 'sec1', enc)).status).toBe(0);
  });

  it('amend adds and erases key slots as qemu-img does, and refuses what it refuses with nothing written', async () => {
    const f = t.path('slots.qcow2');
    qemuCreate('-q', '-f', 'qcow2', '--object', OBJ, '-o', LUKS, f, '1M');
    qemuIo(opts(f), ['write -P 0x3c 0 64k']);
    const objs = ['--object', OBJ, '--object', OBJ1];
    const slots = () => (JSON.parse(qemuImg('info', '--output=json', f))['format-specific'].data.encrypt.slots as Array<{ active: boolean }>).map((x) => x.active);
    const add = await strata('amend', ...objs, '--image-opts', opts(f), '-o', 'encrypt.state=active,encrypt.new-secret=sec1,encrypt.iter-time=10,encrypt.keyslot=3');
    expect(add.err).toBe('');
    expect(add.code).toBe(0);
    expect(slots()).toStrictEqual([true, false, false, true, false, false, false, false]);
    // QEMU opens it with the new key and reads the data.
    expect(qemuIo(opts(f, 'sec1'), ['read -P 0x3c 0 64k'], [OBJ1])).not.toMatch(/fail/i);
    const before = await sha256(f);
    for (const [o, msg] of [
      ['encrypt.state=active,encrypt.new-secret=sec0,encrypt.keyslot=3', /Refusing to overwrite active keyslot 3/],
      ['encrypt.state=inactive,encrypt.keyslot=5', /keyslot 5 is already erased/],
      ['encrypt.state=inactive,encrypt.old-secret=sec9', /No secret with id 'sec9'/],
      ['encrypt.state=inactive', /either explicit keyslot index or the password/],
    ] as const) {
      const r = await strata('amend', ...objs, '--image-opts', opts(f), '-o', o);
      expect(r.code).not.toBe(0);
      expect(r.err.trim().split('\n')).toHaveLength(1);
      expect(r.err).toMatch(msg);
    }
    expect(await sha256(f)).toBe(before);
    // Erasing the first key by its password leaves the second one.
    const del = await strata('amend', ...objs, '--image-opts', opts(f, 'sec1'), '-o', 'encrypt.state=inactive,encrypt.old-secret=sec0');
    expect(del.code).toBe(0);
    expect(slots()).toStrictEqual([false, false, false, true, false, false, false, false]);
    expect(qemuImgRun('check', '--object', OBJ, '--image-opts', opts(f)).stderr).toMatch(/Invalid password, cannot unlock any keyslot/);
    const last = await strata('amend', ...objs, '--image-opts', opts(f, 'sec1'), '-o', 'encrypt.state=inactive,encrypt.keyslot=3');
    expect(last.err).toMatch(/only active keyslot 3/);
    expect(qemuRaw(opts(f, 'sec1'), t.path('slots.raw'), [OBJ1]).subarray(0, 65536).every((b) => b === 0x3c)).toBe(true);
  });
});
