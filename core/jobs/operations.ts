// runJob: a job from its JSON description, as the app's job process runs it. It plans first
// (planJob, the same code as --dry-run), refuses with one line when the plan says so (InUseError
// when an image is in use, IoError for space or permissions, UsageError naming --force when
// other images would change), and then runs the job following that plan.
import { basename } from 'node:path';
import type { DiskImage } from '../engine/image';
import { openImage, closeChain } from '../chain/open';
import type { JobContext } from './job';
import { convert } from './convert';
import { compact } from './compact';
import { commit } from './commit';
import { emptyOverlay } from './empty';
import { merge } from './merge';
import { rebase } from './rebase';
import { mirrorFiles } from './mirror';
import { snapshotJob } from './snapshot';
import { resize } from './resize';
import { checkImage } from './check';
import { createPlanned, resolveCreate } from './create';
import { abs, enforcePlan, type JobPlan, type JobResult, type JobSpec } from './plan-kit';
import { convertOptions, convertSource, createOptions, mirrorOptions, planJob } from './plan';

export type { JobResult } from './plan-kit';
export { planJob, planToJson, planToText, planRunnable } from './plan';

function bytes(n: number): string {
  return `${n} bytes`;
}

/** Runs a job: plans it, refuses as the plan says, then runs it following the plan. */
export async function runJob(ctx: JobContext, spec: JobSpec, opts: { force?: boolean } = {}): Promise<JobResult & { plan: JobPlan }> {
  const plan = await planJob(spec, ctx);
  enforcePlan(plan, opts.force);
  const force = opts.force;
  const done = (summary: string, bytesWritten: number, outputs: string[]) => ({ operation: spec.op, summary, bytesWritten, outputs: outputs.map(abs), plan });
  switch (spec.op) {
    case 'convert': {
      const src = await openImage(spec.source, { format: spec.sourceFormat, lock: spec.forceShare ? 'none' : 'auto' });
      try {
        const from: DiskImage = await convertSource(src, spec.snapshot, spec.source);
        const r = await convert(ctx, from, spec.target, { ...convertOptions(spec), force }, plan);
        return done(`converted ${basename(spec.source)} to ${spec.target}: ${bytes(r.bytesWritten)} written`, r.bytesWritten, [spec.target]);
      } finally {
        await closeChain(src);
      }
    }
    case 'mirror': {
      const r = await mirrorFiles(ctx, spec.source, spec.target, { ...mirrorOptions(spec), force }, plan);
      return done(`${r.bytesWritten} bytes written, ${r.bytesZeroed} bytes zeroed, ${r.bytesRead} bytes read`, r.bytesWritten, [spec.target]);
    }
    case 'compact': {
      const r = await compact(ctx, spec.image, { compress: spec.compress }, plan);
      return done(`compacted ${basename(spec.image)} from ${r.before} to ${r.after} bytes`, r.bytesWritten, [spec.image]);
    }
    case 'commit': {
      const r = await commit(ctx, spec.image, { base: spec.base, keep: spec.keep, force }, plan);
      return done(`committed ${bytes(r.bytesCopied)} into ${r.base}`, r.dataBytesWritten, plan.writes);
    }
    case 'empty': {
      const r = await emptyOverlay(ctx, spec.image, plan);
      return done(`emptied ${basename(spec.image)} (${r.method}) after comparing ${bytes(r.bytesCompared)}`, 0, [spec.image]);
    }
    case 'merge': {
      const r = await merge(ctx, spec.image, { folders: spec.folders, force }, plan);
      return done(`merged ${basename(spec.image)} into ${r.backing}${r.children.length ? `; ${r.children.length} image(s) now use it` : ''}`, r.bytesWritten, [r.backing, ...r.children]);
    }
    case 'rebase': {
      const r = await rebase(ctx, spec.image, { backing: spec.backing, backingFormat: spec.backingFormat, backingFormatName: spec.backingFormatName, unsafe: spec.unsafe, force }, plan);
      return done(`rebased ${basename(spec.image)}: ${bytes(r.bytesWritten)} written`, r.dataBytesWritten, [spec.image]);
    }
    case 'snapshot': {
      await snapshotJob(spec.image, spec.action, spec.name, { force, qemu: spec.qemu }, plan);
      return done(`snapshot '${spec.name}' ${spec.action === 'create' ? 'created' : spec.action === 'apply' ? 'applied' : 'deleted'}`, 0, [spec.image]);
    }
    case 'resize': {
      const r = await resize(spec.image, { size: spec.size, shrink: spec.shrink, relative: spec.relative, format: spec.format, preallocation: spec.preallocation, force }, plan);
      return done(`resized ${basename(spec.image)} from ${r.from} to ${r.to} bytes`, 0, [spec.image]);
    }
    case 'check': {
      const r = await checkImage(ctx, spec.image, { repair: spec.repair, format: spec.format }, plan);
      const fixed = r.repaired ? `${r.repaired.leaks} leaks and ${r.repaired.corruptions} corruptions repaired` : 'nothing to repair';
      return done(fixed, 0, [spec.image]);
    }
    case 'create': {
      await createPlanned(await resolveCreate(spec.image, spec.format, createOptions(spec)), ctx, { force }, plan);
      return done(`created ${spec.image}`, 0, [spec.image]);
    }
    default: {
      const never: never = spec;
      return never;
    }
  }
}
