// Targets of convert and mirror: created fresh (through `create`, so they are laid out as
// qemu-img would) or opened existing; removed again when a job that created one fails.
import { unlink } from '../io/fs-async';
import { UsageError } from '../errors';
import { isWritable, type WritableImage } from '../engine/image';
import { openImage, closeChain } from '../chain/open';
import { localPath } from '../chain/names';
import { createImage, type CreateOptions } from './create';

export interface TargetSpec {
  format: 'raw' | 'qcow2';
  /** Creation options for a fresh target (-o, -B). */
  create?: CreateOptions;
  /** -n: write into an existing target. */
  existing?: boolean;
  /** --target-is-zero: the existing target reads as zero everywhere. */
  targetIsZero?: boolean;
  /** -t: 'unsafe' (qemu-img convert's default) never syncs the target; 'writeback' does at the end. */
  cache?: 'unsafe' | 'writeback';
}

export interface Target {
  image: WritableImage;
  created: boolean;
  /** The target reads as zero wherever nothing is written (fresh, no backing file). */
  zeroInitialized: boolean;
  hasBacking: boolean;
}

export async function openTarget(path: string, size: number, spec: TargetSpec): Promise<Target> {
  if (!spec.existing) {
    await createImage(path, { ...spec.create, size, format: spec.format });
  }
  let image;
  try {
    // An encrypted target is keyed by the secret its creation options name.
    image = await openImage(path, { format: spec.format, writable: true, unsafe: spec.cache === 'unsafe', keySecret: spec.create?.keySecret });
  } catch (err) {
    if (!spec.existing) await unlink(localPath(path)).catch(() => {});
    throw err;
  }
  if (!isWritable(image)) {
    await closeChain(image);
    throw new UsageError(`${path}: cannot be written`);
  }
  if (image.virtualSize < size) {
    await closeChain(image);
    throw new UsageError(`${path}: target is smaller (${image.virtualSize} bytes) than the source (${size} bytes)`);
  }
  const hasBacking = image.backing !== null;
  return { image, created: !spec.existing, zeroInitialized: spec.existing ? !!spec.targetIsZero : !hasBacking, hasBacking };
}

/** Closes the target; a target the job created is removed (it is incomplete). */
export async function abandonTarget(t: Target, path: string): Promise<void> {
  await closeChain(t.image).catch(() => {});
  if (t.created) await unlink(localPath(path)).catch(() => {});
}
