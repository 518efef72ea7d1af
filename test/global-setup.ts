// Once before the whole run: the build outputs the tests use (the strata command, which is
// also the job process, the renderer, the Electron bundles) are made fresh if stale, so no two
// test files build at the same time.
import { buildIsStale, ensureBuilt } from './build';

export default function setup(): void {
  if (buildIsStale()) ensureBuilt();
}
