// run_code through a real `corral serve` with the unmodified @e2b/code-interpreter JS SDK (server from
// E2B_API_URL, E2B_SANDBOX_URL, E2B_API_KEY). Prints one line per check, exits non-zero on failure.
import assert from 'node:assert/strict'
import { Sandbox } from '@e2b/code-interpreter'

async function check(name, body) {
  await body()
  console.log(`ok ${name}`)
}

const sbx = await Sandbox.create('code-interpreter-v1', { timeoutMs: 120_000 })
try {
  await check('state and results', async () => {
    await sbx.runCode('x = 20')
    const execution = await sbx.runCode('print("hi"); x * 2')
    assert.equal(execution.text, '40')
    assert.deepEqual(execution.logs.stdout, ['hi\n'])
  })
  await check('errors', async () => {
    const execution = await sbx.runCode('undefined_name')
    assert.equal(execution.error.name, 'NameError')
  })
  await check('contexts', async () => {
    const ctx = await sbx.createCodeContext({ cwd: '/tmp' })
    assert.equal((await sbx.runCode('import os; os.getcwd()', { context: ctx })).text, '/tmp')
    await sbx.removeCodeContext(ctx)
  })
  await check('dataframe', async () => {
    const execution = await sbx.runCode("import pandas as pd; pd.DataFrame({'a': [1, 2]})")
    assert.deepEqual(execution.results[0].data, { a: [1, 2] })
  })
  await check('javascript', async () => {
    const execution = await sbx.runCode('const n: number = 6; console.log("js"); n * 7', { language: 'ts' })
    assert.equal(execution.text, '42')
    assert.deepEqual(execution.logs.stdout, ['js\n'])
    const failed = await sbx.runCode('null.x', { language: 'js' })
    assert.equal(failed.error.name, 'TypeError')
  })
  await check('str results', async () => {
    assert.equal((await sbx.runCode('process.cwd()', { language: 'js' })).text, '/home/user')
    assert.equal((await sbx.runCode("import os; os.getenv('X')", { envs: { X: 'value' } })).text, 'value')
  })
  await check('abandoned execution', async () => {
    const ctx = await sbx.createCodeContext()
    await assert.rejects(sbx.runCode('import time; time.sleep(300)', { context: ctx, timeoutMs: 3_000 }))
    // The server noticed the client leave and interrupted the sleep: 10 s is the bound.
    assert.equal((await sbx.runCode('1 + 1', { context: ctx, timeoutMs: 10_000 })).text, '2')
    await sbx.removeCodeContext(ctx)
  })
} finally {
  await sbx.kill()
}

const fresh = await Sandbox.create('code-interpreter-v1', { timeoutMs: 120_000 })
try {
  await check('default contexts', async () => {
    const languages = (await fresh.listCodeContexts()).map((c) => c.language).sort()
    assert.deepEqual(languages, ['javascript', 'python'])
  })
} finally {
  await fresh.kill()
}
console.log('passed')
