// convert with what the job spec does not carry: several sources (read one after another),
// -C (copy offloading), --salvage, --image-opts names. The same convert, opened here.
import { closeChain, openImage } from '../chain/open';
import { ConcatImage } from '../chain/concat';
import type { DiskImage, LayerStatus } from '../engine/image';
import { chainBlockStatus } from '../chain/block-status';
import { convert } from './convert';
import type { JobContext } from './job';
import { convertOptions, convertSource } from './plan';
import type { SpecOf } from './plan-kit';
import { assertNotInChain, openImageFile } from '../chain/open';
import { Qcow2Image } from '../engine/qcow2';
import { Qcow2Writable } from '../engine/qcow2-write';
import { BME_FLAG_AUTO, BME_FLAG_IN_USE } from '../format/bitmaps';
import { UnsupportedFeatureError, UsageError, printable } from '../errors';
import { readBits, storeBitmaps, type Bm } from './bitmap';

export interface DirectExtras {
  copyOffload: boolean;
  salvage: boolean;
  force: boolean;
  /** --bitmaps: the source's persistent bitmaps copied to the target; skipBroken: --skip-broken-bitmaps. */
  bitmaps?: boolean;
  skipBroken?: boolean;
}

const qemuError = (text: string) => new UnsupportedFeatureError(text).asQemu(text);

export async function convertDirect(ctx: JobContext, sources: string[], target: string, spec: SpecOf<'convert'>, extra: DirectExtras): Promise<void> {
  const opts = { ...convertOptions(spec), copyOffload: extra.copyOffload, salvage: extra.salvage, force: extra.force };
  const opened: DiskImage[] = [];
  try {
    for (const s of sources) opened.push(await openImage(s, { format: spec.sourceFormat, lock: spec.forceShare ? 'none' : 'auto' }));
    // Creating the target empties it: none of the sources may be (or read) it.
    for (const img of opened) await assertNotInChain(target, img, 'convert');
    // qemu-img's refusal, after opening the sources and before anything else of the target.
    if (opened.length > 1 && (spec.backing !== undefined || spec.options?.backing_file !== undefined)) {
      throw new UsageError('several sources are joined into one target: a backing file for it (-B, backing_file=) makes no sense; convert them without one')
        .asQemu('Having a backing file for the target makes no sense when concatenating multiple input images');
    }
    if (extra.bitmaps) {
      if (opened.length !== 1) throw qemuError('Copying bitmaps only possible with single source');
      const s = opened[0]!;
      if (!(s instanceof Qcow2Image)) throw qemuError('Source lacks bitmap support');
      // QEMU walks the loaded bitmaps last first: the last inconsistent one is named.
      const broken = [...(s.bitmaps ?? [])].reverse().find((e) => e.flags & BME_FLAG_IN_USE);
      if (broken && !extra.skipBroken) {
        const name = printable(broken.name);
        throw new UnsupportedFeatureError(`Cannot copy inconsistent bitmap '${name}'\nTry --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it`)
          .asQemu(`Cannot copy inconsistent bitmap '${name}'\nTry --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it`);
      }
      // Refused before the target is made (qemu-img creates it first).
      if (spec.targetFormat !== 'qcow2') throw qemuError(`Format driver '${spec.targetFormat}' does not support bitmaps`);
    }
    let src: DiskImage = opened.length === 1 ? await convertSource(opened[0]!, spec.snapshot, sources[0]!) : new ConcatImage(opened);
    if (extra.salvage) src = new SalvageImage(src, ctx.log);
    await convert(ctx, src, target, opts);
    if (extra.bitmaps) await copyAllBitmaps(ctx, opened[0] as Qcow2Image, target, !!extra.skipBroken);
  } finally {
    for (const img of opened) await closeChain(img).catch(() => {});
  }
}

/**
 * convert --bitmaps: each persistent bitmap of the source is added to the target with its
 * granularity and enabled state and its bits merged in (qemu-img's convert_copy_bitmaps), in
 * the source directory's order; inconsistent ones are skipped with
 * a warning under --skip-broken-bitmaps.
 */
async function copyAllBitmaps(ctx: JobContext, src: Qcow2Image, target: string, skipBroken: boolean): Promise<void> {
  const dst = await openImageFile(target, { format: 'qcow2', writable: true });
  try {
    if (!(dst instanceof Qcow2Writable)) throw qemuError("Format driver 'raw' does not support bitmaps");
    const bms: Bm[] = [];
    for (const e of dst.bitmaps ?? []) bms.push(e.flags & BME_FLAG_IN_USE ? { entry: { ...e }, data: null, old: [] } : { entry: { ...e }, ...(await readBits(dst, e)) });
    // Warned about in QEMU's walk order (last first); stored in the source's order.
    for (const e of [...(src.bitmaps ?? [])].reverse()) {
      if (e.flags & BME_FLAG_IN_USE && skipBroken) ctx.log?.(`warning: Skipping inconsistent bitmap '${printable(e.name)}'`);
    }
    for (const e of src.bitmaps ?? []) {
      if (e.flags & BME_FLAG_IN_USE) continue;
      if (bms.some((b) => b.entry.name === e.name)) throw qemuError(`Failed to create bitmap ${printable(e.name)}: Bitmap already exists: ${printable(e.name)}`);
      const { data } = await readBits(src, e);
      bms.push({ entry: { ...e, flags: e.flags & BME_FLAG_AUTO, bitmapTableOffset: 0, bitmapTableSize: 0 }, data, old: [] });
    }
    await storeBitmaps(dst, bms, []);
  } finally {
    await dst.close();
  }
}

/**
 * --salvage's view of a source: a block status that fails is taken as one sector of data
 * (qemu-img retries on ever shorter ranges down to one sector, warns, and reads it), with
 * qemu-img's warning once per sector; reads go through read(), whose failures convert's
 * salvage read turns into zeros.
 */
export class SalvageImage implements DiskImage {
  readonly format: DiskImage['format'];
  readonly backingFile = null;
  readonly backingFormat = null;
  backing: DiskImage | null = null;
  private readonly warned = new Set<number>();

  constructor(private readonly inner: DiskImage, private readonly log?: (line: string) => void) {
    this.format = inner.format;
  }

  get filename(): string { return this.inner.filename; }
  get file() { return this.inner.file; }
  get virtualSize(): number { return this.inner.virtualSize; }

  read(buf: Uint8Array, offset: number): Promise<void> { return this.inner.read(buf, offset); }

  async blockStatus(offset: number, bytes: number): Promise<LayerStatus> {
    // As qemu-img: a failing range is asked again a quarter as long, down to one sector.
    let n = Math.max(1, Math.ceil(bytes / 512));
    for (;;) {
      try {
        const st = await chainBlockStatus(this.inner, offset, Math.min(bytes, n * 512));
        return { length: st.length, allocated: true, data: st.data, zero: st.zero, offset: null, compressed: st.compressed };
      } catch (err) {
        if (n > 1) { n = Math.ceil(n / 4); continue; }
        return this.failed(offset, bytes, err);
      }
    }
  }

  private failed(offset: number, bytes: number, err: unknown): LayerStatus {
    {
      const sector = Math.floor(offset / 512) * 512;
      if (!this.warned.has(sector)) {
        this.warned.add(sector);
        const code = (err as NodeJS.ErrnoException).code;
        this.log?.(`warning: error while reading block status at offset ${sector}: ${code && code !== 'EIO' ? (err as Error).message : 'Input/output error'}`);
      }
      return { length: Math.min(bytes, sector + 512 - offset), allocated: true, data: true, zero: false, offset: null, compressed: false };
    }
  }

  close(): Promise<void> { return Promise.resolve(); }
}
