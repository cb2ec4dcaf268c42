// Drives a desktop sandbox with the unmodified @e2b/desktop SDK (npm), as tests/test_desktop_js_sdk.py runs
// it: E2B_API_URL, E2B_SANDBOX_URL, E2B_API_KEY and E2B_DOMAIN from the environment.
// Usage: node desktop.mjs <dir>. Writes the screenshots it takes into <dir> and prints one JSON report of
// what it saw (with `error` set when a step failed, the steps before it still reported), then exits
// non-zero on a failure.
import { writeFileSync } from 'node:fs'
import { request } from 'node:http'
import { join } from 'node:path'
import { CommandExitError, Sandbox } from '@e2b/desktop'

const [outputDir] = process.argv.slice(2)
const report = {}
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

async function waitFor(what, check, timeoutMs = 60_000) {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const result = await check()
    if (result) return result
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs / 1000}s waiting for ${what}`)
    await sleep(250)
  }
}

// The PNG's signature and its IHDR's width and height.
function pngHeader(bytes) {
  const data = Buffer.from(bytes)
  return { signature: data.subarray(0, 8).toString('hex'), width: data.readUInt32BE(16),
           height: data.readUInt32BE(20), bytes: data.length }
}

async function windowsOf(desktop, application) {
  try {
    return (await desktop.getApplicationWindows(application)).filter((w) => w)
  } catch (error) {
    if (error instanceof CommandExitError) return [] // xdotool exits 1 while there is none
    throw error
  }
}

// The application's windows once it has one (for waitFor: an empty array is truthy).
async function someWindowsOf(desktop, application) {
  const windows = await windowsOf(desktop, application)
  return windows.length > 0 && windows
}

// x, y, width and height of a window's client area on the screen.
async function geometry(desktop, windowId) {
  const out = (await desktop.commands.run(`xwininfo -id ${windowId}`)).stdout
  const field = (label) => Number(out.match(new RegExp(`${label}:\\s+(-?\\d+)`))[1])
  return { x: field('Absolute upper-left X'), y: field('Absolute upper-left Y'), width: field('Width'),
           height: field('Height') }
}

async function focusedWindow(desktop, windowId) {
  return (await desktop.getCurrentWindowId()) === windowId
}

// GET of a path on the sandbox's port through Corral's proxy, routed by the Host header as a browser's
// request to the SDK's URL is: the status and whether the body names noVNC.
function getThroughProxy(host, path) {
  const proxy = new URL(process.env.E2B_SANDBOX_URL)
  return new Promise((resolve, reject) => {
    const req = request({ host: proxy.hostname, port: proxy.port, path, headers: { host } }, (res) => {
      let body = ''
      res.setEncoding('utf8')
      res.on('data', (chunk) => { body += chunk })
      res.on('end', () => resolve({ status: res.statusCode, noVNC: body.includes('noVNC') }))
    })
    req.on('error', reject)
    req.end()
  })
}

async function steps(desktop) {
  report.sandboxId = desktop.sandboxId

  const screenshot = await desktop.screenshot()
  writeFileSync(join(outputDir, 'screenshot.png'), screenshot)
  report.screenshot = pngHeader(screenshot)
  report.screenSize = await desktop.getScreenSize()

  await desktop.moveMouse(100, 200)
  report.cursor = await desktop.getCursorPosition()

  // Typing into the text editor, saved and read back.
  const note = '/home/user/js-note.txt'
  await desktop.files.write(note, '')
  await desktop.launch('mousepad', note)
  const [editor] = await waitFor('the editor\'s window', () => someWindowsOf(desktop, 'mousepad'))
  await waitFor('the editor to have the focus', () => focusedWindow(desktop, editor))
  await desktop.write('Typed by @e2b/desktop from Node.js, in chunks!')
  await desktop.press(['ctrl', 's'])
  report.typed = await waitFor('the saved file', async () => (await desktop.files.read(note)).trim(), 20_000)

  report.windows = {
    editor, mousepad: await windowsOf(desktop, 'mousepad'), current: await desktop.getCurrentWindowId(),
    title: await desktop.getWindowTitle(editor),
  }

  // A double click on the title bar (xfwm4 draws it just above the client area) maximizes the window.
  const before = await geometry(desktop, editor)
  await desktop.doubleClick(before.x + 80, before.y - 12)
  report.maximized = await waitFor('the editor to fill the screen\'s width', async () => {
    const now = await geometry(desktop, editor)
    return now.width === report.screenSize.width && now
  }, 10_000)

  // A terminal opens on top; a left click on the editor where the terminal does not cover it gives the
  // editor the focus back.
  await desktop.launch('xfce4-terminal')
  const [terminal] = await waitFor('the terminal\'s window', () => someWindowsOf(desktop, 'xfce4-terminal'))
  // xdotool getwindowfocus names a child of the terminal's top-level window: wait for "not the editor".
  await waitFor('the editor to lose the focus', async () => !(await focusedWindow(desktop, editor)))
  const covered = await geometry(desktop, terminal)
  const point = covered.x + covered.width < report.screenSize.width - 60
    ? [report.screenSize.width - 30, covered.y + 100] : [30, report.screenSize.height - 60]
  await desktop.leftClick(...point)
  report.clickFocus = {
    terminal, point, focusedAfterClick: await waitFor('the editor to have the focus again',
      async () => (await focusedWindow(desktop, editor)) && editor, 10_000),
  }

  // The live stream, with an auth key.
  await desktop.stream.start({ requireAuth: true })
  const key = desktop.stream.getAuthKey()
  const host = desktop.getHost(6080)
  report.stream = {
    host, key, url: desktop.stream.getUrl({ authKey: key }), urlWithoutKey: desktop.stream.getUrl(),
    x11vnc: (await desktop.commands.run('pgrep -a x11vnc')).stdout.trim(),
    page: await getThroughProxy(host, '/vnc.html'),
  }
  let startedTwice = null
  try {
    await desktop.stream.start({ requireAuth: true })
  } catch (error) {
    startedTwice = error.message
  }
  report.stream.startedTwice = startedTwice
  await desktop.stream.stop()
  report.streamStopped = {
    x11vnc: (await desktop.commands.run('pgrep -x x11vnc || true')).stdout.trim(),
    page: await waitFor('the stream\'s port to close', async () => {
      const page = await getThroughProxy(host, '/vnc.html')
      return page.status === 502 && page
    }, 10_000),
  }
}

let failed = false
const desktop = await Sandbox.create({ allowInternetAccess: false, timeoutMs: 300_000 })
try {
  await steps(desktop)
} catch (error) {
  report.error = `${error.stack}`
  failed = true
  // What the screen and the window manager looked like when the step failed, for a person to look at.
  writeFileSync(join(outputDir, 'failure.png'), await desktop.screenshot())
  report.failureWindows = (await desktop.commands.run(
    'echo focus: $(xdotool getwindowfocus); for w in $(xdotool search --onlyvisible --name .); do ' +
    'echo "$w $(xdotool getwindowname $w)"; done',
    { timeoutMs: 20_000 }).catch((e) => e)).stdout
} finally {
  await desktop.kill()
  report.runningAfterKill = await desktop.isRunning().catch((error) => `isRunning: ${error.message}`)
}
console.log(JSON.stringify(report))
process.exit(failed ? 1 : 0)
