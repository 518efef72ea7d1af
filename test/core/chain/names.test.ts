// Image names in QEMU's syntaxes: plain paths, file:, json:{...}, and protocols.
import { describe, expect, it } from 'vitest';
import { hasProtocol, localPath, parseImageName } from '../../../core/chain/names';
import { combineBackingPath } from '../../../core/chain/open';
import { FormatError, UnsupportedFeatureError } from '../../../core/errors';

describe('parseImageName', () => {
  it('plain paths, including colons after a slash', () => {
    expect(parseImageName('a.qcow2')).toEqual({ kind: 'file', path: 'a.qcow2' });
    expect(parseImageName('/x/y:z.qcow2')).toEqual({ kind: 'file', path: '/x/y:z.qcow2' });
    expect(parseImageName('./a:b.qcow2')).toEqual({ kind: 'file', path: './a:b.qcow2' });
  });

  it('file: and host_device: name paths (the rest may hold colons)', () => {
    expect(parseImageName('file:sub/base.qcow2')).toEqual({ kind: 'file', path: 'sub/base.qcow2' });
    // A path that would read as a protocol is named ./PATH, as QEMU names it.
    expect(parseImageName('file:a:b')).toEqual({ kind: 'file', path: './a:b' });
    expect(parseImageName('file:/x/a:b')).toEqual({ kind: 'file', path: '/x/a:b' });
    expect(parseImageName('host_device:/dev/sdb')).toEqual({ kind: 'file', path: '/dev/sdb' });
  });

  it('json: with a format driver over a file, nested or dotted, with or without a driver', () => {
    expect(parseImageName('json:{"driver":"qcow2","file":{"driver":"file","filename":"/x/base.qcow2"}}'))
      .toEqual({ kind: 'file', path: '/x/base.qcow2', format: 'qcow2', noBacking: false });
    expect(parseImageName('json:{"file.driver":"file","file.filename":"b.raw","driver":"raw"}'))
      .toEqual({ kind: 'file', path: 'b.raw', format: 'raw', noBacking: false });
    expect(parseImageName('json:{"file":{"filename":"c.qcow2"},"backing":null}'))
      .toEqual({ kind: 'file', path: 'c.qcow2', format: undefined, noBacking: true });
    expect(parseImageName('json:{"driver":"file","filename":"d"}')).toEqual({ kind: 'file', path: 'd', format: 'raw', noBacking: false });
  });

  it('protocols: by prefix, by json driver, by json file driver', () => {
    expect(parseImageName('nbd://localhost:10809/x')).toEqual({ kind: 'protocol', protocol: 'nbd' });
    expect(parseImageName('nbd:localhost:10809')).toEqual({ kind: 'protocol', protocol: 'nbd' });
    expect(parseImageName('https://example.com/x.qcow2')).toEqual({ kind: 'protocol', protocol: 'https' });
    // blkdebug is one of QEMU's test drivers Strata opens (test-drivers.ts): a filter over the file.
    expect(parseImageName('blkdebug::a.qcow2')).toEqual({ kind: 'file', path: 'a.qcow2', test: { display: 'blkdebug::a.qcow2', blkdebug: {} } });
    expect(parseImageName('blkdebug::nbd://h/x')).toEqual({ kind: 'protocol', protocol: 'nbd' });
    expect(parseImageName('weird:thing')).toEqual({ kind: 'protocol', protocol: 'weird' });
    expect(parseImageName('json:{"driver":"vmdk","file":{"driver":"file","filename":"x"}}')).toEqual({ kind: 'protocol', protocol: 'vmdk' });
    expect(parseImageName('json:{"driver":"qcow2","file":{"driver":"nbd","server":{"type":"inet","host":"h","port":"1"}}}')).toEqual({ kind: 'protocol', protocol: 'nbd' });
  });

  it('bad json: typed errors', () => {
    expect(() => parseImageName('json:{bad')).toThrow(FormatError);
    expect(() => parseImageName('json:[1]')).toThrow(FormatError);
    expect(() => parseImageName('json:{"driver":"qcow2"}')).toThrow(/no file/);
    expect(() => parseImageName('json:{"file":"node0"}')).toThrow(/Cannot find device='node0'/);
  });

  it('localPath refuses protocols in one line, naming the driver', () => {
    expect(localPath('file:x')).toBe('x');
    expect(() => localPath('nbd://h/x')).toThrow(UnsupportedFeatureError);
    expect(() => localPath('nbd://h/x')).toThrow(/is an NBD export, and Strata's NBD client is read-only/);
    expect(() => localPath('http://h/x')).toThrow(/'http' driver/);
    expect(() => localPath('vm:1.qcow2')).toThrow(/write \.\/vm:1\.qcow2/);
  });
});

describe('combineBackingPath (bdrv_make_absolute_filename)', () => {
  it('relative names against the overlay folder; absolute and protocol names as they are', () => {
    expect(combineBackingPath('/d/top.qcow2', 'base.qcow2')).toBe('/d/base.qcow2');
    expect(combineBackingPath('top.qcow2', 'base.qcow2')).toBe('base.qcow2');
    expect(combineBackingPath('/d/top.qcow2', '/e/base.qcow2')).toBe('/e/base.qcow2');
    expect(combineBackingPath('/d/top.qcow2', 'file:base.qcow2')).toBe('file:base.qcow2');
    expect(combineBackingPath('/d/top.qcow2', 'json:{"file":{"filename":"b"}}')).toBe('json:{"file":{"filename":"b"}}');
    expect(hasProtocol('a/b:c')).toBe(false);
  });
});
