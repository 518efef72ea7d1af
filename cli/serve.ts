// strata serve: the app in a browser on 127.0.0.1, with a per-run token in the printed URL.
// The same services as the desktop window; jobs run in their own processes.
import { spawn } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { UsageError } from '../core/errors';
import { AppServices } from '../main/services/app-services';
import { ForkJobHost } from '../main/services/job-host';
import { defaultDataDir } from '../main/services/settings';
import { startServer } from '../main/server/http-server';
import { parse, str, type CommandIO } from './common';

const USAGE = 'strata serve [--port N] [--folder DIR]... [--demo] [--no-open]';

/** The repository's (or package's) dist/ folder: the renderer and the command bundle live there. */
export function distDir(): string {
  return join(dirname(fileURLToPath(import.meta.url)), '..', 'dist');
}

/** Opens the URL in the desktop's browser, when there is a desktop and BROWSER is not "none". */
export function openBrowser(url: string, env: NodeJS.ProcessEnv = process.env): boolean {
  if (env.BROWSER === 'none' || (!env.DISPLAY && !env.WAYLAND_DISPLAY)) return false;
  try {
    const child = spawn(env.BROWSER || 'xdg-open', [url], { stdio: 'ignore', detached: true });
    child.on('error', () => {});
    child.unref();
    return true;
  } catch {
    return false;
  }
}

export async function serveCommand(args: string[], io: CommandIO, signal: AbortSignal): Promise<number> {
  const { values, positionals } = parse(args, {
    port: { type: 'string' },
    folder: { type: 'string', multiple: true },
    demo: { type: 'boolean' },
    'no-open': { type: 'boolean' },
  }, USAGE);
  if (positionals.length) throw new UsageError(`unexpected argument '${positionals[0]}' (folders go after --folder)\nusage: ${USAGE}`);
  const portText = str(values.port);
  const port = portText === undefined ? 0 : Number(portText);
  if (!Number.isInteger(port) || port < 0 || port > 65535) throw new UsageError(`--port must be a port number (0-65535), not '${portText}'`);
  const log = (line: string) => io.err(`strata serve: ${line}\n`);
  const dist = distDir();
  const services = await AppServices.create({
    dataDir: defaultDataDir(), mode: 'browser', host: new ForkJobHost(join(dist, '..', 'bin', 'strata.cjs')),
    folders: (values.folder as string[] | undefined) ?? [], demo: !!values.demo, log,
  });
  const server = await startServer({ services, root: join(dist, 'renderer'), port, log });
  io.out(`Strata is at ${server.url}\n(only this machine can reach it; from another one: ssh -L ${server.port}:127.0.0.1:${server.port} THIS-HOST, then open the same URL)\n`);
  if (!values['no-open'] && openBrowser(server.url)) io.out('Opened in your browser.\n');
  io.out('Press Ctrl-C to stop: running jobs are cancelled cleanly first.\n');
  await new Promise<void>((resolve) => {
    if (signal.aborted) resolve();
    else signal.addEventListener('abort', () => resolve(), { once: true });
  });
  io.out('Stopping: cancelling running jobs…\n');
  await server.close();
  await services.close();
  return 0;
}
