// convert with what the job spec does not carry: several sources (read one after another),
// -C (copy offloading), --salvage, --image-opts names. The same convert, opened here.
import { closeChain, openImage } from '../chain/open';
import { ConcatImage } from '../chain/concat';
import type { DiskImage } from '../engine/image';
import { convert } from './convert';
import type { JobContext } from './job';
import { convertOptions, convertSource } from './plan';
import type { SpecOf } from './plan-kit';
import { assertNotInChain } from '../chain/open';

export async function convertDirect(ctx: JobContext, sources: string[], target: string, spec: SpecOf<'convert'>, extra: { copyOffload: boolean; salvage: boolean; force: boolean }): Promise<void> {
  const opts = { ...convertOptions(spec), copyOffload: extra.copyOffload, salvage: extra.salvage, force: extra.force };
  const opened: DiskImage[] = [];
  try {
    for (const s of sources) opened.push(await openImage(s, { format: spec.sourceFormat, lock: spec.forceShare ? 'none' : 'auto' }));
    // Creating the target empties it: none of the sources may be (or read) it.
    for (const img of opened) await assertNotInChain(target, img, 'convert');
    const src = opened.length === 1 ? await convertSource(opened[0]!, spec.snapshot, sources[0]!) : new ConcatImage(opened);
    await convert(ctx, src, target, opts);
  } finally {
    for (const img of opened) await closeChain(img).catch(() => {});
  }
}
