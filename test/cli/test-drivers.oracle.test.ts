// QEMU's test drivers (blkdebug, null-co, quorum) in image names, against qemu-img: names in
// QEMU's JSON (single quotes), blkdebug config files (a bad one refused in one line), each
// blkdebug event the engine reports failing the step QEMU fails and leaving an image qemu-img
// check calls uncorrupted with the guest's data intact, null-co as a convert source, and how
// info shows such images.
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import { afterAll, describe, expect, it } from 'vitest';
import { describeOracle, qemuCheck, qemuImg, qemuImgRun, qemuIo, tempDir } from '../oracle/qemu';
import { asQemuImg, sha256, strata } from './run-cli';
import { parseImageName } from '../../core/chain/names';
import { qemuJsonToJson } from '../../core/chain/test-drivers';
import { BlkdebugFile, blkdebugRules, parseBlkdebugConfig } from '../../core/io/blkdebug';
import { MemoryFile } from '../../core/io/memory-file';
import { FormatError } from '../../core/errors';

describe('QEMU JSON and blkdebug names', () => {
  it('reads strings in single quotes as QEMU does', () => {
    expect(JSON.parse(qemuJsonToJson(`{'a': 'x', "b": 'it\\'s "q"', 'c': [1, true, null], 'd': "\\u0041\\n"}`)))
      .toStrictEqual({ a: 'x', b: 'it\'s "q"', c: [1, true, null], d: 'A\n' });
    const single = parseImageName(`json:{'driver': 'qcow2', 'file': {'driver': 'file', 'filename': '/x/a.qcow2'}}`);
    expect(single).toStrictEqual(parseImageName('json:{"driver": "qcow2", "file": {"driver": "file", "filename": "/x/a.qcow2"}}'));
    expect(() => parseImageName(`json:{'driver': 'qcow2`)).toThrow(/Could not parse the JSON options/);
  });

  it('takes blkdebug:CONFIG:IMAGE, blkdebug::IMAGE and blkdebug in json:', () => {
    expect(parseImageName('blkdebug:/c/b.conf:/x/t.qcow2')).toMatchObject({ kind: 'file', path: '/x/t.qcow2', test: { display: 'blkdebug:/c/b.conf:/x/t.qcow2', blkdebug: { config: '/c/b.conf' } } });
    expect(parseImageName('blkdebug::t.qcow2')).toMatchObject({ kind: 'file', path: 't.qcow2', test: { blkdebug: {} } });
    const j = `json:{'driver': 'qcow2', 'file': {'driver': 'blkdebug', 'inject-error': [{'event': 'write_aio', 'errno': 28, 'once': true}], 'image': {'driver': 'file', 'filename': '/x/b.qcow2'}}}`;
    expect(parseImageName(j)).toMatchObject({ kind: 'file', path: '/x/b.qcow2', format: 'qcow2', test: { display: j, blkdebug: { injectError: [{ event: 'write_aio', errno: 28, once: true }] } } });
    // Over a format node blkdebug passes everything through: the image itself.
    expect(parseImageName('json:{"driver": "blkdebug", "image": {"driver": "qcow2", "file": {"driver": "file", "filename": "/x/t.qcow2"}}, "align": "4k"}'))
      .toStrictEqual({ kind: 'file', path: '/x/t.qcow2', format: 'qcow2', noBacking: false });
    expect(() => parseImageName('blkdebug:/x/t.qcow2')).toThrow(/requires both config file and image path/);
    expect(parseImageName(`json:{'driver': 'null-co', 'size': 1048576, 'read-zeroes': true}`)).toMatchObject({ kind: 'null', size: 1048576 });
  });

  it('reads a config file in QEMU ini syntax', () => {
    const rules = parseBlkdebugConfig([
      '# a comment', '', '[inject-error]', 'event = "read_aio"', 'errno = "28"', 'once ="on"', 'sector = "8"', '',
      '[set-state]', 'event = "l2_load"', 'state = "1"', 'new_state = "2"', '', '[inject-error]', 'event = "write_aio"', 'state = "2"', 'immediately = "off"',
    ].join('\n'), 'b.conf');
    expect(rules).toStrictEqual([
      { action: 'inject', event: 'read_aio', state: 0, errno: 28, once: true, immediately: false, offset: 4096, iotypes: expect.any(Set) },
      { action: 'set-state', event: 'l2_load', state: 1, newState: 2 },
      { action: 'inject', event: 'write_aio', state: 2, errno: 5, once: false, immediately: false, offset: -1, iotypes: expect.any(Set) },
    ]);
  });

  for (const [what, text, msg] of [
    ['an unknown event', '[inject-error]\nevent = "write_everything"\n', /b\.conf:1: 'write_everything' is not a blkdebug event/],
    ['a value without quotes', '[inject-error]\nevent = read_aio\n', /b\.conf:2: parse error/],
    ['no space before =', '[inject-error]\nevent="read_aio"\n', /b\.conf:2: parse error/],
    ['an unknown section', '[inject-errors]\nevent = "read_aio"\n', /b\.conf:1: there is no section \[inject-errors\]/],
    ['an unknown option', '[inject-error]\nevent = "read_aio"\nerrnum = "5"\n', /b\.conf:1: \[inject-error\] has no option 'errnum'/],
    ['a bad number', '[inject-error]\nevent = "read_aio"\nerrno = "five"\n', /'errno' must be a number, not 'five'/],
    ['a bad flag', '[inject-error]\nevent = "read_aio"\nonce = "maybe"\n', /'once' must be on or off/],
    ['an option before any section', 'event = "read_aio"\n', /b\.conf:1: no group defined/],
    ['a rule without an event', '[set-state]\nnew_state = "2"\n', /b\.conf:1: \[set-state\] needs an event/],
  ] as const) {
    it(`refuses a config file with ${what} in one line`, () => {
      let err: unknown;
      try { parseBlkdebugConfig(text, 'b.conf'); } catch (e) { err = e; }
      expect(err).toBeInstanceOf(FormatError);
      expect((err as Error).message).toMatch(msg);
      expect((err as Error).message).not.toContain('\n');
    });
  }

  it('fails the operations after an armed event, once or until the next event', async () => {
    const inner = new MemoryFile('m', Buffer.alloc(65536, 7));
    const f = new BlkdebugFile(inner, blkdebugRules({ injectError: [{ event: 'write_aio', errno: 28, once: true }, { event: 'read_aio', sector: 8 }] }, 'm'));
    const b = Buffer.alloc(512);
    await f.write(b, 0);
    f.debugEvent('l2_load');
    await f.read(b, 0);
    f.debugEvent('write_aio');
    await expect(f.write(b, 0)).rejects.toMatchObject({ code: 'ENOSPC' });
    await f.write(b, 0);
    f.debugEvent('write_aio');
    await f.write(b, 0);
    // sector = 8: only a request reaching byte 4096 fails, each time.
    f.debugEvent('read_aio');
    await f.read(b, 0);
    await expect(f.read(b, 4096)).rejects.toMatchObject({ code: 'EIO' });
    await expect(f.read(Buffer.alloc(8192), 0)).rejects.toMatchObject({ code: 'EIO' });
    expect(f.injected).toHaveLength(3);
  });

  it('moves the state with set-state, and rules wait for their state', async () => {
    const f = new BlkdebugFile(new MemoryFile('m', Buffer.alloc(4096)), blkdebugRules({
      setState: [{ event: 'l2_load', new_state: 2 }],
      injectError: [{ event: 'read_aio', state: 2 }],
    }, 'm'));
    const b = Buffer.alloc(512);
    f.debugEvent('read_aio');
    await f.read(b, 0);
    f.debugEvent('l2_load');
    f.debugEvent('read_aio');
    await expect(f.read(b, 0)).rejects.toMatchObject({ code: 'EIO' });
  });
});

describeOracle('QEMU test drivers against qemu-img', () => {
  const t = tempDir('strata-test-drivers-');
  afterAll(() => t.cleanup());
  const conf = t.path('blkdebug.conf');
  const setConfig = (event: string, extra = '') => writeFileSync(conf, `[inject-error]\nevent = "${event}"\n${extra}`);

  /** base (empty) <- top (64k of 0xcd at 0): the chain 098 commits. */
  function chain(prefix: string): { base: string; top: string } {
    const base = t.path(`${prefix}.base.qcow2`);
    const top = t.path(`${prefix}.qcow2`);
    qemuImg('create', '-q', '-f', 'qcow2', base, '64M');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top, '64M');
    qemuIo(top, ['write -P 0xcd 0 64k']);
    return { base, top };
  }

  function uncorrupted(file: string): void {
    const c = qemuCheck(file);
    // 0: clean; 3: leaked clusters only.
    expect([0, 3]).toContain(c.status);
    expect(c.json.corruptions ?? 0).toBe(0);
  }

  const readsAs = (file: string, cmd: string) => expect(qemuIo(file, [cmd])).toMatch(/^read /);

  it('a bad config file is refused in one line, and the image is not touched', async () => {
    const { top } = chain('badconf');
    const before = await sha256(top);
    writeFileSync(conf, '[inject-error]\nevent = "no_such_event"\n');
    for (const argv of [['info', `blkdebug:${conf}:${top}`], ['commit', `blkdebug:${conf}:${top}`], ['info', `blkdebug:${t.path('missing.conf')}:${top}`]]) {
      const r = await strata(...argv);
      expect(r.code).not.toBe(0);
      expect(r.err.trim().split('\n')).toHaveLength(1);
      expect(r.err).toMatch(/blkdebug/);
    }
    expect(await sha256(top)).toBe(before);
  });

  it('read_aio: compare fails the read as qemu-img does (074)', async () => {
    const a = t.path('cmp.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', a, '64M');
    const b = t.path('cmp2.qcow2');
    copyFileSync(a, b);
    qemuIo(a, ['write -P 102 512 512']);
    setConfig('read_aio', 'errno = "5"\nonce ="off"\n');
    const name = `blkdebug:${conf}:${a}`;
    const q = qemuImgRun('compare', name, b);
    const r = await asQemuImg('compare', name, b);
    expect(r.code).toBe(4);
    expect(r.code).toBe(q.status);
    expect(r.err).toBe(q.stderr);
    expect(r.err).toBe(`qemu-img: Error while reading offset 0 of ${name}: Input/output error\n`);
    uncorrupted(a);
  });

  it('write_aio: committing into a blkdebug base fails with the injected errno (020), base uncorrupted', async () => {
    const base = t.path('wb.base.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', base, '1M');
    const backing = `json:{'driver': 'qcow2', 'file': { 'driver': 'blkdebug', 'inject-error': [{ 'event': 'write_aio', 'errno': 28, 'once': true }], 'image': { 'driver': 'file', 'filename': '${base}' }}}`;
    const top = t.path('wb.qcow2');
    const q = qemuImgRun('create', '-f', 'qcow2', '-b', backing, '-F', 'qcow2', top);
    const r = await asQemuImg('create', '-f', 'qcow2', '-b', backing, '-F', 'qcow2', top);
    expect(r.code).toBe(0);
    expect(r.out).toBe(q.stdout);
    qemuIo(top, ['writev -P 0x5a 0 64k']);
    const c = await asQemuImg('commit', top);
    expect(c.code).toBe(1);
    expect(c.err).toBe('qemu-img: Block job failed: No space left on device\n');
    uncorrupted(base);
    uncorrupted(top);
    readsAs(top, 'read -P 0x5a 0 64k');
    // In Strata's words: the file and the failed write.
    const s = await strata('commit', top);
    expect(s.code).not.toBe(0);
    expect(s.err.trim().split('\n')).toHaveLength(1);
    expect(s.err).toMatch(/no space left/);
  });

  for (const event of ['l1_update', 'empty_image_prepare', 'refblock_alloc', 'reftable_update']) {
    it(`${event}: emptying the overlay after a commit fails in one line and leaves at most leaks (098)`, async () => {
      const { base, top } = chain(`e-${event}`);
      setConfig(event);
      const name = `blkdebug:${conf}:${top}`;
      const r = await asQemuImg('commit', name);
      expect(r.code).toBe(1);
      expect(r.err).toBe(`qemu-img: Failed to empty ${name}: Input/output error\n`);
      uncorrupted(top);
      uncorrupted(base);
      // The data reached the base, and the chain reads it whatever the overlay kept.
      readsAs(base, 'read -P 0xcd 0 64k');
      readsAs(top, 'read -P 0xcd 0 64k');
      if (event === 'l1_update') {
        // QEMU fails the same first write: neither leaves anything behind.
        expect(qemuCheck(top).status).toBe(0);
        const { top: qtop } = chain('e-qemu');
        expect(qemuImgRun('commit', `blkdebug:${conf}:${qtop}`).stderr).toBe(`qemu-img: Failed to empty blkdebug:${conf}:${qtop}: Input/output error\n`);
      }
    });
  }

  it('cluster_free: snapshot -d fails before anything changes, the snapshot stays (217)', async () => {
    const img = t.path('snap.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '64M');
    qemuIo(img, ['write -P 0x33 0 64k']);
    qemuImg('snapshot', '-c', 'foo', img);
    const before = await sha256(img);
    setConfig('cluster_free', 'errno = "5"\n');
    const r = await asQemuImg('snapshot', '-d', 'foo', `blkdebug:${conf}:${img}`);
    expect(r.code).toBe(1);
    expect(r.err).toBe('qemu-img: Could not delete snapshot \'foo\': Failed to remove snapshot from snapshot list: Input/output error\n');
    uncorrupted(img);
    expect(qemuImg('snapshot', '-l', img)).toContain('foo');
    // Only unused clusters may have been written: the image reads and lists as before.
    readsAs(img, 'read -P 0x33 0 64k');
    expect((await strata('snapshot', '-d', 'foo', img)).code).toBe(0);
    expect(qemuCheck(img).status).toBe(0);
    expect(before).not.toBe(await sha256(img));
  });

  it('null-co: a convert source that reads zeros, sparse or not (150)', async () => {
    const src = `json:{ 'driver': 'null-co', 'size': 1048576, 'read-zeroes': true }`;
    for (const sparse of ['512', '0']) {
      const ours = t.path(`null-${sparse}.qcow2`);
      const theirs = t.path(`null-${sparse}.qemu.qcow2`);
      expect((await strata('convert', '-O', 'qcow2', '-S', sparse, src, ours)).code).toBe(0);
      qemuImg('convert', '-O', 'qcow2', '-S', sparse, src, theirs);
      const map = (f: string) => JSON.parse(qemuImg('map', '--output=json', f)).map((e: Record<string, unknown>) => ({ ...e, offset: undefined, filename: undefined }));
      expect(map(ours)).toStrictEqual(map(theirs));
      expect(qemuImgRun('compare', ours, theirs).status).toBe(0);
    }
    // Nothing can be written to it.
    const w = await strata('convert', '-O', 'qcow2', t.path('null-0.qcow2'), src);
    expect(w.code).not.toBe(0);
  });

  it('info through blkdebug and quorum json: names written with single quotes (110)', async () => {
    const base = t.path('q.qcow2.base');
    const img = t.path('q.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', base, '64M');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'q.qcow2.base', '-F', 'qcow2', img, '64M');
    copyFileSync(img, `${img}.copy`);
    const names = [
      `json:{'driver':'qcow2','file':{'driver':'file','filename':'${img}'}}`,
      `json:{'driver': 'qcow2', 'file': {'driver': 'blkdebug', 'image': {'driver': 'file', 'filename': '${img}'}, 'set-state': [{'event': 'read_aio', 'new_state': 42}]}}`,
      `json:{'driver': 'qcow2', 'file': {'driver': 'quorum', 'vote-threshold': 1, 'children': [{'driver': 'file', 'filename': '${img}'}, {'driver': 'file', 'filename': '${img}.copy'}]}}`,
    ];
    for (const name of names) {
      const pick = (j: Record<string, unknown>) => ({ format: j.format, size: j['virtual-size'], b: j['backing-filename'], full: j['full-backing-filename'], json: String(j.filename).startsWith('json:') });
      const q = JSON.parse(qemuImg('info', '--output=json', name));
      const r = await strata('info', '--output=json', name);
      expect(r.code).toBe(0);
      expect(pick(JSON.parse(r.out))).toStrictEqual(pick(q));
    }
    const human = await asQemuImg('info', names[2]!);
    expect(human.out).toContain('backing file: q.qcow2.base (cannot determine actual path)\n');
    // A quorum is read-only here.
    expect((await strata('commit', names[2]!)).code).not.toBe(0);
  });

  it('map --image-opts through blkdebug over a qcow2 node shows the image (204)', async () => {
    const img = t.path('m.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '16M');
    qemuIo(img, ['write -P 1 1M 2M', 'write -z 8M 1M']);
    const opts = `driver=blkdebug,image.driver=qcow2,image.file.driver=file,image.file.filename=${img},align=4k`;
    const r = await strata('map', '--output=json', '--image-opts', opts);
    expect(r.code).toBe(0);
    expect(JSON.parse(r.out)).toStrictEqual(JSON.parse(qemuImg('map', '--output=json', '--image-opts', opts)));
    expect(readFileSync(img).length).toBeGreaterThan(0);
    // blkdebug over the file: the data is in the blkdebug node, which map names as QEMU does.
    const name = `blkdebug::${img}`;
    const human = await strata('map', name);
    expect(human.out).toBe(qemuImg('map', name));
    expect(human.out).toContain(`${name}\n`);
  });
});
