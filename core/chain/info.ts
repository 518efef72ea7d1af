// `info`: what qemu-img info reports, with its JSON field names and its human layout.
import { decodeLuksHeader, LUKS_HEADER_LEN, LuksError, luksInfo } from '../engine/luks';
import { CorruptImageError } from '../errors';
import * as C from '../format/constants';
import { BME_FLAG_AUTO, BME_FLAG_IN_USE } from '../format/bitmaps';
import type { DiskImage } from '../engine/image';
import { Qcow2Image } from '../engine/qcow2';
import { NbdImage } from '../engine/nbd';
import { NbdFile } from '../io/nbd';
import { hasRawExternalData } from '../format/header';
import type { SnapshotEntry } from '../format/snapshot';
import { combineBackingPath } from './open';
import { hasProtocol } from './names';
import { sizeToStr } from './size-str';

export interface SnapshotInfo {
  id: string;
  name: string;
  'vm-state-size': number;
  'date-sec': number;
  'date-nsec': number;
  'vm-clock-sec': number;
  'vm-clock-nsec': number;
  icount?: number;
}

export interface ImageInfo {
  'virtual-size': number;
  filename: string;
  'cluster-size'?: number;
  format: string;
  /** Absent where there is no file to measure (an NBD export: "disk size: unavailable"). */
  'actual-size'?: number;
  'format-specific'?: { type: 'qcow2'; data: Record<string, unknown> };
  'full-backing-filename'?: string;
  'backing-filename'?: string;
  'backing-filename-format'?: string;
  'dirty-flag'?: boolean;
  /** Only for encrypted images (qemu-img leaves it out otherwise). */
  encrypted?: boolean;
  snapshots?: SnapshotInfo[];
}

export function snapshotInfo(s: SnapshotEntry): SnapshotInfo {
  const info: SnapshotInfo = {
    id: s.id,
    name: s.name,
    'vm-state-size': s.vmStateSize,
    'date-sec': s.dateSec,
    'date-nsec': s.dateNsec,
    'vm-clock-sec': Number(s.vmClockNsec / 1_000_000_000n),
    'vm-clock-nsec': Number(s.vmClockNsec % 1_000_000_000n),
  };
  if (s.icount !== -1n && s.icount !== 0xffffffffffffffffn) info.icount = Number(s.icount);
  return info;
}

export async function imageInfo(img: DiskImage): Promise<ImageInfo> {
  // An NBD node: what qemu-img shows of it (no disk size, no dirty flag: the driver has no info).
  if (img instanceof NbdImage) return { 'virtual-size': img.virtualSize, filename: img.filename, format: img.driver };
  const info: ImageInfo = {
    'virtual-size': img.virtualSize,
    filename: img.displayName ?? img.filename,
    format: img.format,
    'dirty-flag': false,
  };
  if (!(img.file instanceof NbdFile)) info['actual-size'] = img.file.allocatedSize ? await img.file.allocatedSize() : await img.file.size();
  if (img instanceof Qcow2Image) {
    const h = img.header;
    info['cluster-size'] = img.geometry.clusterSize;
    const data: Record<string, unknown> = { compat: h.version === 2 ? '0.10' : '1.1', 'compression-type': h.compressionType === C.COMPRESSION_ZSTD ? 'zstd' : 'zlib' };
    if (h.version === 3) {
      data['lazy-refcounts'] = (h.compatibleFeatures & C.COMPAT_LAZY_REFCOUNTS) !== 0n;
      const bitmaps = bitmapInfo(img);
      if (bitmaps) data.bitmaps = bitmaps;
    }
    data['refcount-bits'] = 2 ** h.refcountOrder;
    if (img.encrypted) data.encrypt = img.header.cryptMethod === C.CRYPT_LUKS ? await luksEncryptInfo(img) : { format: 'aes' };
    if (img.geometry.externalData) {
      // As qemu-img: the name the image records (none once cleared), and the raw flag.
      if (img.parsed.dataFile) data['data-file'] = img.parsed.dataFile;
      data['data-file-raw'] = hasRawExternalData(h);
    }
    if (h.version === 3) {
      data.corrupt = (h.incompatibleFeatures & C.INCOMPAT_CORRUPT) !== 0n;
      data['extended-l2'] = img.geometry.extendedL2;
    }
    info['format-specific'] = { type: 'qcow2', data };
    info['dirty-flag'] = (h.incompatibleFeatures & C.INCOMPAT_DIRTY) !== 0n;
    if (img.encrypted) info.encrypted = true;
    if (img.snapshots.length) info.snapshots = img.snapshots.map(snapshotInfo);
  }
  if (img.backingFile) {
    // An image without a directory (a quorum) cannot resolve a relative name: QEMU leaves it out.
    if (!img.noDirname || img.backingFile.startsWith('/') || hasProtocol(img.backingFile)) info['full-backing-filename'] = combineBackingPath(img.filename, img.backingFile);
    info['backing-filename'] = img.backingFile;
    if (img.backingFormat) info['backing-filename-format'] = img.backingFormat;
  }
  return info;
}

function bitmapInfo(img: Qcow2Image): unknown[] | null {
  return img.bitmaps && img.bitmaps.map((e) => {
    const flags: string[] = [];
    if (e.flags & BME_FLAG_IN_USE) flags.push('in-use');
    if (e.flags & BME_FLAG_AUTO) flags.push('auto');
    return { flags, name: e.name, granularity: 2 ** e.granularityBits };
  });
}

export function formatInfoHuman(info: ImageInfo): string {
  let s = `image: ${info.filename}\nfile format: ${info.format}\n` +
    `virtual size: ${sizeToStr(info['virtual-size'])} (${info['virtual-size']} bytes)\n` +
    `disk size: ${info['actual-size'] === undefined ? 'unavailable' : sizeToStr(info['actual-size'])}\n`;
  if (info.encrypted) s += 'encrypted: yes\n';
  if (info['cluster-size'] !== undefined) s += `cluster_size: ${info['cluster-size']}\n`;
  if (info['dirty-flag']) s += 'cleanly shut down: no\n';
  if (info['backing-filename'] !== undefined) {
    s += `backing file: ${info['backing-filename']}`;
    if (info['full-backing-filename'] === undefined) s += ' (cannot determine actual path)';
    else if (info['full-backing-filename'] !== info['backing-filename']) s += ` (actual path: ${info['full-backing-filename']})`;
    s += '\n';
    if (info['backing-filename-format']) s += `backing file format: ${info['backing-filename-format']}\n`;
  }
  if (info.snapshots) s += 'Snapshot list:\n' + formatSnapshotTable(info.snapshots);
  if (info['format-specific']) s += 'Format specific information:\n' + dumpValue(info['format-specific'].data, 1);
  return s;
}

/** The table `qemu-img snapshot -l` and `info` print (bdrv_snapshot_dump). */
export function formatSnapshotTable(snaps: SnapshotInfo[]): string {
  let s = `${'ID'.padEnd(10)}${'TAG'.padEnd(17)}${'VM SIZE'.padStart(8)}${'DATE'.padStart(20)}${'VM CLOCK'.padStart(13)}${'ICOUNT'.padStart(11)}\n`;
  for (const sn of snaps) {
    const d = new Date(sn['date-sec'] * 1000);
    const p2 = (n: number) => String(n).padStart(2, '0');
    const date = `${d.getFullYear()}-${p2(d.getMonth() + 1)}-${p2(d.getDate())} ${p2(d.getHours())}:${p2(d.getMinutes())}:${p2(d.getSeconds())}`;
    const secs = sn['vm-clock-sec'];
    const clock = `${p2(Math.floor(secs / 3600))}:${p2(Math.floor(secs / 60) % 60)}:${p2(secs % 60)}.${String(Math.floor(sn['vm-clock-nsec'] / 1e6) % 1000).padStart(3, '0')}`;
    s += `${sn.id.padEnd(9)} ${sn.name.padEnd(16)} ${sizeToStr(sn['vm-state-size']).padStart(8)}${date.padStart(20)}${clock.padStart(13)}${(sn.icount !== undefined ? String(sn.icount) : '').padStart(11)}\n`;
  }
  return s;
}

function dumpValue(v: unknown, indent: number): string {
  const pad = '    '.repeat(indent);
  let s = '';
  if (Array.isArray(v)) {
    v.forEach((item, i) => {
      if (item !== null && typeof item === 'object') s += `${pad}[${i}]:\n${dumpValue(item, indent + 1)}`;
      else s += `${pad}[${i}]: ${String(item)}\n`;
    });
    return s;
  }
  for (const [k, val] of Object.entries(v as Record<string, unknown>)) {
    const key = k.replace(/-/g, ' ');
    if (val !== null && typeof val === 'object') s += `${pad}${key}:\n${dumpValue(val, indent + 1)}`;
    else s += `${pad}${key}: ${String(val)}\n`;
  }
  return s;
}

/** A LUKS image's encrypt block, read from its LUKS header (no key needed). */
async function luksEncryptInfo(img: Qcow2Image): Promise<Record<string, unknown>> {
  const area = img.parsed.cryptoHeader;
  const buf = Buffer.alloc(LUKS_HEADER_LEN);
  if (!area || area.length < buf.length || (await img.file.read(buf, area.offset)) < buf.length) {
    throw new CorruptImageError('the LUKS header is missing or cut short', img.filename);
  }
  try {
    return luksInfo(decodeLuksHeader(buf));
  } catch (err) {
    if (err instanceof LuksError) throw new CorruptImageError(`LUKS header: ${err.message}`, img.filename).asQemu(`Could not open '${img.filename}': ${err.message}`);
    throw err;
  }
}
