// Strata's read-only NBD client against qemu-img: images served by qemu-nbd (a unix socket in
// a temp folder, and TCP) read the same through strata as through qemu-img: info and map,
// byte for byte, through every spelling of the name (URLs, nbd:, json:, --image-opts) and with
// x-dirty-bitmap (a persistent bitmap, qemu:allocation-depth); convert from an export equals
// the image. Writes to an export refuse in one line. A fake server (a small net server here)
// that sends a bad reply, or none, gets one line naming the export and the problem, quickly.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { describeOracle, qemuImg, qemuImgRun, qemuIo, tempDir } from '../oracle/qemu';
import { poll } from '../oracle/holders';
import { asQemuImg, sha256, strata } from './run-cli';
import { parseNbdName } from '../../core/chain/nbd-name';
import { nbdFilename } from '../../core/io/nbd';

const MiB = 1 << 20;

/** qemu-nbd ARGS, serving until stopped; resolves once `ready` says it listens. */
async function qemuNbd(args: string[], ready: () => boolean): Promise<() => Promise<void>> {
  const child: ChildProcess = spawn('qemu-nbd', ['--persistent', ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => { stderr += d.toString(); });
  const stop = () => new Promise<void>((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) return resolve();
    child.once('exit', () => resolve());
    child.kill('SIGTERM');
  });
  try {
    await poll(() => {
      if (child.exitCode !== null) throw new Error(`qemu-nbd exited early (${child.exitCode}): ${stderr}`);
      return ready();
    }, 15_000, 'qemu-nbd to listen');
  } catch (err) {
    await stop();
    throw err;
  }
  return stop;
}

/** A TCP port nobody listens on right now. */
async function freePort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  const port = (s.address() as { port: number }).port;
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}

describeOracle('NBD exports (read-only client, as qemu-img)', () => {
  const t = tempDir('strata-nbd-');
  const base = t.path('base.qcow2');
  const top = t.path('top.qcow2');
  const odd = t.path('odd.raw');
  const sock = t.path('top.sock');
  const oddSock = t.path('odd.sock');
  const qcowSock = t.path('qcow.sock');
  const stops: (() => Promise<void>)[] = [];
  let port = 0;

  beforeAll(async () => {
    qemuImg('create', '-q', '-f', 'qcow2', base, '4M');
    qemuIo(base, ['write -P 1 0 2M']);
    qemuImg('create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top, '4M');
    qemuIo(top, ['write -P 2 1M 2M']);
    qemuImg('bitmap', '--add', '-f', 'qcow2', top, 'b0');
    qemuIo(top, ['write -P 3 3M 64k', 'write -z 3136k 64k']);
    // A raw file whose size is no multiple of 512, with a hole in it, under an export name.
    qemuImg('create', '-q', '-f', 'raw', odd, String(3 * MiB + 1000));
    qemuIo(odd, ['write -P 4 0 1M', 'write -P 5 2M 1000'], { format: 'raw' });
    stops.push(await qemuNbd(['-r', '-f', 'qcow2', '-A', '-B', 'b0', '-k', sock, top], () => existsSync(sock)));
    stops.push(await qemuNbd(['-r', '-f', 'raw', '-x', 'odd one', '-k', oddSock, odd], () => existsSync(oddSock)));
    // The qcow2 file's own bytes (-f raw): the client probes qcow2 over the export.
    stops.push(await qemuNbd(['-r', '-f', 'raw', '-k', qcowSock, base], () => existsSync(qcowSock)));
    port = await freePort();
    stops.push(await qemuNbd(['-r', '-f', 'qcow2', '-b', '127.0.0.1', '-p', String(port), '-x', 'tcp', top],
      () => spawnSync('qemu-nbd', ['--list', '-b', '127.0.0.1', '-p', String(port)]).status === 0));
  }, 60_000);

  afterAll(async () => {
    for (const stop of stops) await stop();
    t.cleanup();
  });

  const opts = () => `driver=nbd,server.type=unix,server.path=${sock}`;
  const names = (): [string, string[]][] => [
    ['--image-opts driver=nbd', ['--image-opts', opts()]],
    ['--image-opts x-dirty-bitmap=qemu:dirty-bitmap:b0', ['--image-opts', `${opts()},x-dirty-bitmap=qemu:dirty-bitmap:b0`]],
    ['--image-opts x-dirty-bitmap=qemu:allocation-depth', ['--image-opts', `${opts()},x-dirty-bitmap=qemu:allocation-depth`]],
    ['json: driver=nbd', [`json:{"driver":"nbd","server":{"type":"unix","path":"${sock}"}}`]],
    ['json: raw over nbd, x-dirty-bitmap', [`json:{"driver":"raw","file":{"driver":"nbd","path":"${sock}","x-dirty-bitmap":"qemu:allocation-depth"}}`]],
    ['nbd+unix URL', [`nbd+unix:///?socket=${sock}`]],
    ['nbd+unix URL, -f raw', ['-f', 'raw', `nbd+unix:///?socket=${sock}`]],
    ['nbd:unix: name', [`nbd:unix:${sock}`]],
    ['odd-sized raw export with a %-escaped name', [`nbd+unix:///odd%20one?socket=${oddSock}`]],
    ['odd-sized raw export, --image-opts with export=', ['--image-opts', `driver=nbd,server.type=unix,server.path=${oddSock},export=odd one`]],
    ['a qcow2 image served as raw bytes (probed as qcow2)', [`nbd+unix:///?socket=${qcowSock}`]],
    ['nbd:// over TCP', [`nbd://127.0.0.1:${port}/tcp`]],
    ['nbd: HOST:PORT over TCP', [`nbd:127.0.0.1:${port}:exportname=tcp`]],
  ];

  it('info and map (human and JSON) print exactly what qemu-img prints, for every spelling of the name', async () => {
    for (const [what, args] of names()) {
      for (const cmd of [['info'], ['info', '--output=json'], ['map'], ['map', '--output=json']]) {
        const q = qemuImgRun(...cmd, ...args);
        expect(q.status, `qemu-img ${cmd.join(' ')} (${what}): ${q.stderr}`).toBe(0);
        const r = await strata(...cmd, ...args);
        expect({ what, cmd, err: r.err, out: r.out }).toStrictEqual({ what, cmd, err: '', out: q.stdout });
      }
    }
  });

  it('x-dirty-bitmap reads the bitmap and the allocation depth the way qemu-img does (what the iotests rely on)', async () => {
    const bitmap = JSON.parse((await strata('map', '--output=json', '--image-opts', `${opts()},x-dirty-bitmap=qemu:dirty-bitmap:b0`)).out) as { start: number; length: number; data: boolean }[];
    // The bitmap's dirty range (3M, 64k granularity: two writes after --add) reads as "data": false.
    expect(bitmap.filter((e) => !e.data).map((e) => [e.start, e.length])).toStrictEqual([[3 * MiB, 128 << 10]]);
    const depth = JSON.parse((await strata('map', '--output=json', '--image-opts', `${opts()},x-dirty-bitmap=qemu:allocation-depth`)).out) as { start: number; present: boolean; zero: boolean; data: boolean }[];
    // Local (depth 1) runs read as neither data nor zero: not present, no offset.
    expect(depth.find((e) => e.start === MiB)).toMatchObject({ present: false, zero: false, data: false });
    expect(depth.find((e) => e.start === MiB)).not.toHaveProperty('offset');
  });

  it('convert -O raw (and -O qcow2) from an export equals the image; compare agrees', async () => {
    const want = t.path('want.raw');
    qemuImg('convert', '-O', 'raw', top, want);
    for (const name of [`nbd+unix:///?socket=${sock}`, `nbd://127.0.0.1:${port}/tcp`]) {
      const out = t.path('out.raw');
    const conv = ['convert', '-O', 'raw', '-f', 'raw'];
      const r = await strata('convert', '-O', 'raw', name, out);
      expect(r.err).toBe('');
      expect(await sha256(out)).toBe(await sha256(want));
    }
    const q = t.path('out.qcow2');
    expect((await strata('convert', '-O', 'qcow2', '--image-opts', opts(), q)).code).toBe(0);
    expect(qemuImgRun('compare', q, want).status).toBe(0);
    expect((await strata('compare', `nbd+unix:///?socket=${sock}`, want)).code).toBe(0);
    const oddOut = t.path('odd-out.raw');
    expect((await strata('convert', '-O', 'raw', `nbd+unix:///odd%20one?socket=${oddSock}`, oddOut)).code).toBe(0);
    expect(qemuImgRun('compare', '-f', 'raw', '-F', 'raw', oddOut, odd).status).toBe(0);
  });

  it('writing to an export refuses in one line; nothing is written', async () => {
    const before = await sha256(top);
    const url = `nbd+unix:///?socket=${sock}`;
    const t0 = Date.now();
    for (const args of [['resize', url, '8M'], ['create', '-f', 'raw', url, '1M'], ['convert', '-O', 'raw', base, url], ['bitmap', '--add', url, 'x'],
      ['amend', '-o', 'compat=1.1', url], ['dd', `if=${base}`, `of=${url}`], ['compact', url], ['io', '-c', 'write 0 1k', url]]) {
      const r = await strata(...args);
      expect(r.code, args.join(' ')).not.toBe(0);
      expect(r.err.trim().split('\n'), args.join(' ')).toHaveLength(1);
      expect(r.err, args.join(' ')).toMatch(/is an NBD export, and Strata's NBD client is read-only/);
    }
    // check: nothing to check in an export, as qemu-img says.
    const c = await strata('check', url);
    expect(c.code).toBe(qemuImgRun('check', url).status);
    expect(c.err).toBe('strata: This image format does not support checks\n');
    expect(await sha256(top)).toBe(before);
    // The plan step and the job open the export in turn (qemu-nbd takes one client at a time).
    expect(Date.now() - t0).toBeLessThan(10_000);
  });

  it('a missing export, bitmap or socket is one line naming it (qemu-img\'s words as qemu-img)', async () => {
    const noExport = await strata('info', `nbd+unix:///nope?socket=${sock}`);
    expect(noExport.err).toBe(`strata: nbd+unix:///nope?socket=${sock}: NBD: the server has no export 'nope' (it says: export 'nope' not present)\n`);
    const asQ = await asQemuImg('info', `nbd+unix:///nope?socket=${sock}`);
    expect(asQ.err).toBe(qemuImgRun('info', `nbd+unix:///nope?socket=${sock}`).stderr);
    const noSock = `nbd+unix:///?socket=${t.path('none.sock')}`;
    expect((await asQemuImg('info', noSock)).err).toBe(qemuImgRun('info', noSock).stderr);
    const noBitmap = await strata('map', '--image-opts', `${opts()},x-dirty-bitmap=qemu:dirty-bitmap:nope`);
    expect(noBitmap.code).toBe(1);
    expect(noBitmap.err).toBe(`strata: nbd+unix://?socket=${sock}: requested x-dirty-bitmap qemu:dirty-bitmap:nope not found\n`);
  });

  it('NBD names parse as QEMU parses them, and get QEMU\'s pseudo-filenames', () => {
    const f = (n: string) => nbdFilename(parseNbdName(n)!.target);
    expect(f('nbd://h')).toBe('nbd://h:10809');
    expect(f('nbd+tcp://[::1]:99/e')).toBe('nbd://::1:99/e');
    expect(f('nbd+unix:///e%2Fx?socket=/s')).toBe('nbd+unix:///e/x?socket=/s');
    expect(f('nbd:unix:/s:exportname=e')).toBe('nbd+unix:///e?socket=/s');
    expect(f('json:{"driver":"nbd","host":"h","port":1}')).toBe('nbd://h:1');
    expect(f('json:{"driver":"nbd","filename":"nbd+unix://?socket=/s"}')).toBe('nbd+unix://?socket=/s');
    expect(parseNbdName('json:{"driver":"qcow2","file":{"driver":"file","filename":"x"}}')).toBeNull();
    expect(parseNbdName('http://h/x')).toBeNull();
    expect(() => parseNbdName('nbd+unix://h/?socket=/s')).toThrow(/takes no host/);
    expect(() => parseNbdName('nbd://h/x?socket=/s')).toThrow(/takes no parameters/);
    expect(() => parseNbdName('nbd:h')).toThrow(/not a valid NBD name/);
  });
});

// ---- A fake server: a good handshake, then whatever a case sends. ----

interface FakeCase {
  /** Replaces the server's greeting. */
  greeting?: Buffer;
  /** Replaces the reply to NBD_OPT_GO (after the metadata context). */
  goReply?: (opt: (type: number, data: Buffer) => Buffer) => Buffer;
  /** The reply to a transmission request (type, handle bytes, offset, length). */
  onRequest?: (req: { type: number; handle: Buffer; offset: number; length: number }, s: Socket) => void;
  size?: number;
}

const u16 = (n: number) => { const b = Buffer.alloc(2); b.writeUInt16BE(n); return b; };
const u32 = (n: number) => { const b = Buffer.alloc(4); b.writeUInt32BE(n >>> 0); return b; };
const u64 = (n: bigint) => { const b = Buffer.alloc(8); b.writeBigUInt64BE(n); return b; };
const GREETING = Buffer.concat([u64(0x4e42444d41474943n), u64(0x49484156454f5054n), u16(3)]);

function structured(flags: number, type: number, handle: Buffer, payload: Buffer, length = payload.length): Buffer {
  return Buffer.concat([u32(0x668e33ef), u16(flags), u16(type), handle, u32(length), payload]);
}

function fakeServer(path: string, c: FakeCase): Promise<Server> {
  const server = createServer((s) => {
    s.on('error', () => {});
    s.write(c.greeting ?? GREETING);
    let buf = Buffer.alloc(0);
    let state: 'flags' | 'options' | 'transmission' = 'flags';
    s.on('data', (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      for (;;) {
        if (state === 'flags') {
          if (buf.length < 4) return;
          buf = buf.subarray(4);
          state = 'options';
        } else if (state === 'options') {
          if (buf.length < 16) return;
          const len = buf.readUInt32BE(12);
          if (buf.length < 16 + len) return;
          const opt = buf.readUInt32BE(8);
          const data = buf.subarray(16, 16 + len);
          buf = buf.subarray(16 + len);
          const reply = (type: number, payload: Buffer) => Buffer.concat([u64(0x3e889045565a9n), u32(opt), u32(type), u32(payload.length), payload]);
          if (opt === 8) s.write(reply(1, Buffer.alloc(0)));
          else if (opt === 10) s.write(Buffer.concat([reply(4, Buffer.concat([u32(1), Buffer.from('base:allocation')])), reply(1, Buffer.alloc(0))]));
          else if (opt === 7) {
            s.write(c.goReply ? c.goReply(reply) : Buffer.concat([reply(3, Buffer.concat([u16(0), u64(BigInt(c.size ?? MiB)), u16(3)])), reply(1, Buffer.alloc(0))]));
            state = 'transmission';
          } else s.write(reply(0x80000001, Buffer.alloc(0)));
          void data;
        } else {
          if (buf.length < 28) return;
          const req = { type: buf.readUInt16BE(6), handle: Buffer.from(buf.subarray(8, 16)), offset: Number(buf.readBigUInt64BE(16)), length: buf.readUInt32BE(24) };
          buf = buf.subarray(28);
          if (req.type === 2) { s.end(); return; }
          c.onRequest?.(req, s);
        }
      }
    });
  });
  return new Promise((resolve) => server.listen(path, () => resolve(server)));
}

describeOracle('NBD client against a hostile or broken server', () => {
  const t = tempDir('strata-nbd-fake-');
  const saved = process.env.STRATA_NBD_TIMEOUT;
  beforeAll(() => { process.env.STRATA_NBD_TIMEOUT = '1'; });
  afterAll(() => {
    if (saved === undefined) delete process.env.STRATA_NBD_TIMEOUT; else process.env.STRATA_NBD_TIMEOUT = saved;
    t.cleanup();
  });

  let n = 0;
  async function against(c: FakeCase, args: string[] = ['map', '--output=json', '-f', 'raw'], after: string[] = []): Promise<{ code: number; out: string; err: string; ms: number; url: string }> {
    const path = t.path(`fake${n++}.sock`);
    const server = await fakeServer(path, c);
    const url = `nbd+unix://?socket=${path}`;
    const t0 = Date.now();
    try {
      const r = await strata(...args, url, ...after);
      return { ...r, ms: Date.now() - t0, url };
    } finally {
      server.close();
    }
  }

  /** Expects one line naming the export and `problem`, within a few seconds. */
  function refused(r: { code: number; err: string; ms: number; url: string }, problem: RegExp): void {
    expect(r.code).toBe(1);
    expect(r.err.trim().split('\n')).toHaveLength(1);
    expect(r.err.startsWith(`strata: ${r.url}: `)).toBe(true);
    expect(r.err).toMatch(problem);
    expect(r.ms).toBeLessThan(5000);
  }

  const allData = (req: { handle: Buffer; offset: number; length: number }, s: Socket) => {
    s.write(structured(1, 5, req.handle, Buffer.concat([u32(1), u32(req.length), u32(0)])));
  };

  it('a well-behaved fake server is read as it says (so the cases below fail for their own reason)', async () => {
    const r = await against({ onRequest: allData });
    expect(r.err).toBe('');
    expect(r.out).toBe(`[{ "start": 0, "length": ${MiB}, "depth": 0, "present": true, "zero": false, "data": true, "offset": 0}]\n`);
  });

  it('a bad greeting, a bad option reply or an impossible export size: one line', async () => {
    refused(await against({ greeting: Buffer.from('HTTP/1.1 400 Bad Request\r\n\r\n') }), /NBD: the server did not greet as an NBD server/);
    refused(await against({ goReply: () => Buffer.alloc(20, 0xff) }), /option reply with bad magic/);
    refused(await against({ goReply: (o) => Buffer.concat([o(3, Buffer.concat([u16(0), u64(1n << 62n), u16(3)])), o(1, Buffer.alloc(0))]) }), /export size of 4611686018427387904 bytes/);
    refused(await against({ goReply: (o) => o(3, Buffer.concat([u16(0), u64(1n), u16(3), Buffer.alloc(100)])) }), /export information of invalid length/);
    refused(await against({ goReply: (o) => o(1, Buffer.alloc(0)) }), /without the export's size/);
    // Information replies without end.
    refused(await against({ goReply: (o) => Buffer.concat(Array.from({ length: 1100 }, () => o(3, Buffer.concat([u16(2), Buffer.from('x')])))) }), /more than 1000 option replies/);
    // An option reply claiming 4 GiB is refused before anything is buffered.
    refused(await against({ goReply: () => Buffer.concat([u64(0x3e889045565a9n), u32(7), u32(3), u32(0xffffffff)]) }), /option reply of 4294967295 bytes/);
  });

  it('bad transmission replies (magic, handle, lengths, offsets, contexts): one line, no hang', async () => {
    refused(await against({ onRequest: (_q, s) => s.write(Buffer.alloc(32, 0x41)) }), /reply with bad magic 0x41414141/);
    refused(await against({ onRequest: (q, s) => s.write(structured(1, 5, Buffer.alloc(8, 9), Buffer.concat([u32(1), u32(q.length), u32(0)]))) }), /replied to request 0x909090909090909, not to the one sent/);
    refused(await against({ onRequest: (q, s) => s.write(structured(1, 5, q.handle, Buffer.concat([u32(7), u32(q.length), u32(0)]))) }), /block status for context 7, not the negotiated one/);
    refused(await against({ onRequest: (q, s) => s.write(structured(1, 5, q.handle, Buffer.concat([u32(1), u32(0), u32(0)]))) }), /extent of length 0/);
    // A chunk that claims 4 GiB: refused from its header, nothing more is read.
    refused(await against({ onRequest: (q, s) => s.write(structured(1, 5, q.handle, Buffer.alloc(0), 0xfffffff0)) }), /block status chunk of invalid length 4294967280/);
    // Reads (convert): data outside the request, a data chunk longer than the read.
    const read = (f: (q: { handle: Buffer; offset: number; length: number }, s: Socket) => void) => (q: { type: number; handle: Buffer; offset: number; length: number }, s: Socket) => (q.type === 0 ? f(q, s) : allData(q, s));
    const out = t.path('out.raw');
    const conv = ['convert', '-O', 'raw', '-f', 'raw'];
    refused(await against({ onRequest: read((q, s) => s.write(structured(1, 1, q.handle, Buffer.concat([u64(BigInt(q.offset + q.length)), Buffer.alloc(16)])))) }, conv, [out]), /outside the read of/);
    refused(await against({ onRequest: read((q, s) => s.write(structured(1, 1, q.handle, u64(BigInt(q.offset)), 0x7fffffff))) }, conv, [out]), /data chunk of invalid length 2147483647/);
    // The same hole again and again, never done: refused once the chunks cover more than asked.
    refused(await against({ onRequest: read((q, s) => { for (let i = 0; i < 3; i++) s.write(structured(0, 2, q.handle, Buffer.concat([u64(BigInt(q.offset)), u32(q.length)]))); }) }, conv, [out]), /overlapping chunks/);
    refused(await against({ onRequest: read((q, s) => s.write(Buffer.concat([u32(0x67446698), u32(5), q.handle]))) }, conv, [out]), /failed: the server answered EIO/);
    refused(await against({ onRequest: read((q, s) => s.write(structured(3, 0x8001, q.handle, Buffer.concat([u32(28), u16(4), Buffer.from('full')])))) }, conv, [out]), /the server answered ENOSPC \(full\)/);
  });

  it('a server that stops answering times out; one that hangs up mid-reply is named', async () => {
    refused(await against({ greeting: Buffer.alloc(0) }), /NBD: the server sent no answer for 1 s/);
    refused(await against({ onRequest: () => {} }), /NBD: the server sent no answer for 1 s/);
    refused(await against({ onRequest: (q, s) => s.end(structured(1, 5, q.handle, Buffer.alloc(4), 12)) }), /the server closed the connection/);
  });
});
