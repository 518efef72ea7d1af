// What a node's badges say: holders, problems, snapshots, bitmaps, how the backing file is
// named. Short labels on the card, the full sentence in the title and the details panel.
import type { LibraryImage } from '../../lib/store';
import type { Tone } from '../../components/ui';

export interface BadgeInfo {
  key: string;
  label: string;
  tone: Tone;
  title: string;
  /** A problem with fixes: the badge opens them. */
  problem?: string;
}

const PROBLEM_LABEL: Record<string, string> = {
  'backing-missing': 'backing file missing',
  'backing-loop': 'backing loop',
  'backing-unreadable': 'backing unreadable',
  'backing-format-unspecified': 'backing format not recorded',
  'backing-changed': 'backing file changed',
  damaged: 'damaged',
  dirty: 'not closed cleanly',
  corrupt: 'marked corrupt',
  unreadable: 'unreadable',
};

export function problemLabel(code: string): string {
  return PROBLEM_LABEL[code] ?? code;
}

export function holderText(h: { pid: number; program: string; vm: string | null }): string {
  if (h.vm) return `VM ${h.vm}`;
  return h.pid ? `${h.program} (PID ${h.pid})` : h.program;
}

export function badgesFor(img: LibraryImage): BadgeInfo[] {
  const out: BadgeInfo[] = [];
  if (img.inUse) out.push({ key: 'in-use', label: `in use: ${holderText(img.inUse)}`, tone: 'info', title: `Held by ${img.inUse.program}${img.inUse.pid ? ` (PID ${img.inUse.pid})` : ''}${img.inUse.vm ? `, VM '${img.inUse.vm}'` : ''}: Strata will not write it while it is in use` });
  for (const p of img.problems) {
    if (p.code === 'in-use') continue;
    const tone: Tone = p.code === 'backing-changed' || p.code === 'backing-format-unspecified' || p.code === 'dirty' ? 'warn' : 'danger';
    out.push({ key: p.code, label: problemLabel(p.code), tone, title: p.message, problem: img.fixes.some((f) => f.problem === p.code) ? p.code : undefined });
  }
  if (img.snapshots) out.push({ key: 'snapshots', label: `${img.snapshots} snapshot${img.snapshots > 1 ? 's' : ''}`, tone: 'accent', title: `${img.snapshots} internal snapshot${img.snapshots > 1 ? 's' : ''}` });
  if (img.bitmaps) out.push({ key: 'bitmaps', label: `${img.bitmaps} bitmap${img.bitmaps > 1 ? 's' : ''}`, tone: 'neutral', title: 'persistent dirty bitmaps (incremental backups)' });
  if (img.backingName) {
    out.push(img.backingRelative
      ? { key: 'relative', label: 'relative path', tone: 'neutral', title: `Backing file recorded as '${img.backingName}', relative to this image's folder: the pair can move together` }
      : { key: 'absolute', label: 'absolute path', tone: 'neutral', title: `Backing file recorded as '${img.backingName}': moving the backing file breaks this image` });
  }
  if (img.external) out.push({ key: 'external', label: 'outside your folders', tone: 'neutral', title: 'Not in the folders you added: shown because an image there uses it as its backing file' });
  return out;
}
