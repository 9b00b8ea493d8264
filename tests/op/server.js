// Test OpenID Provider for oidc-gateway's integration tests.
//
// Runs panva's oidc-provider (OpenID Certified) on 127.0.0.1 only, over plain
// http (loopback only: never expose this). tests/conftest.py starts one per
// pytest run on a free port; each test registers its own confidential client
// through dynamic client registration (RFC 7591, no initial access token),
// because the gateways under test listen on ports unknown when the OP starts.
//
// Two test users, alice/wonderland and bob/builder, and a tiny interaction UI
// (login form + consent form) that a program (tests/support/login.py) drives.
// Claims are in the ID token and in userinfo (conformIdTokenClaims: false).
// RFC 9207: oidc-provider always sends `iss` in authorization responses and
// advertises authorization_response_iss_parameter_supported: true.
//
// Environment (all optional; defaults in brackets):
//   OP_PORT                [7400]
//   OP_ACCESS_TOKEN_TTL    seconds [3600]
//   OP_ID_TOKEN_TTL        seconds [3600]
//   OP_REFRESH_TOKEN_TTL   seconds [86400]
//   OP_AUTH_CODE_TTL       seconds [60]
//   OP_SESSION_TTL         seconds, the OP's own login session [86400]
//   OP_ROTATE_REFRESH      always | never | default [default: oidc-provider's rule]
//   OP_AUTO_INTERACTIONS   [0]; 1: no forms, alice is logged in and consent granted
//   OP_CLIENT_ID           a static confidential client, only when set
//   OP_CLIENT_SECRET       its secret [test-client-secret-0123456789abcdef]
//   OP_REDIRECT_URIS       its redirect URIs, comma separated
//   OP_POST_LOGOUT_URIS    comma separated [the redirect URIs' origins + "/"]
//   OP_TOKEN_AUTH          its token_endpoint_auth_method [client_secret_basic]
//
// API tokens: a client registered with grant_types [client_credentials] (or any grant) and
// asking with resource=<https or urn URI> gets a JWT access token (RFC 9068) with that aud
// (an opaque one for urn:opaque:* resources).
//
// GET /_test/counts answers {"token": {GRANT_TYPE: calls}}: token endpoint calls so far,
// so a test can count refreshes (use a private OP from oidc_provider_factory).
//
// Per-client token lifetimes (so one shared OP serves expiry tests too): a client
// may register with x_access_token_ttl, x_id_token_ttl and x_refresh_token_ttl
// (positive integers, seconds); they override the OP-wide values for that client.
import { createServer } from 'node:http';
import { generateKeyPairSync, randomBytes } from 'node:crypto';

import Provider, { errors } from 'oidc-provider';

const HOST = '127.0.0.1';
const PORT = Number(process.env.OP_PORT || 7400);
const ISSUER = `http://${HOST}:${PORT}`;

function seconds(name, dflt) {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return dflt;
  const n = Number(raw);
  if (!Number.isInteger(n) || n <= 0) {
    console.error(`${name} must be a positive integer (seconds), got ${JSON.stringify(raw)}`);
    process.exit(2);
  }
  return n;
}

const TTL = {
  AccessToken: seconds('OP_ACCESS_TOKEN_TTL', 3600),
  IdToken: seconds('OP_ID_TOKEN_TTL', 3600),
  RefreshToken: seconds('OP_REFRESH_TOKEN_TTL', 86400),
  AuthorizationCode: seconds('OP_AUTH_CODE_TTL', 60),
  Session: seconds('OP_SESSION_TTL', 86400),
};
const ROTATE = process.env.OP_ROTATE_REFRESH || 'default';
const AUTO = process.env.OP_AUTO_INTERACTIONS === '1';

const list = (v) => (v ? v.split(',').map((s) => s.trim()).filter(Boolean) : []);

// Test users. Passwords are test fixtures for a loopback-only provider.
const ACCOUNTS = {
  alice: {
    password: 'wonderland',
    claims: {
      sub: 'alice',
      email: 'alice@example.com',
      email_verified: true,
      name: 'Alice Example',
      preferred_username: 'alice',
      groups: ['eng', 'admins'],
    },
  },
  bob: {
    password: 'builder',
    claims: {
      sub: 'bob',
      email: 'bob@example.org',
      email_verified: true,
      name: 'Bob Example',
      preferred_username: 'bob',
      groups: ['sales'],
    },
  },
};

const staticClients = [];
if (process.env.OP_CLIENT_ID) {
  const redirectUris = list(process.env.OP_REDIRECT_URIS);
  const postLogout = list(process.env.OP_POST_LOGOUT_URIS);
  staticClients.push({
    client_id: process.env.OP_CLIENT_ID,
    client_secret: process.env.OP_CLIENT_SECRET || 'test-client-secret-0123456789abcdef',
    redirect_uris: redirectUris,
    post_logout_redirect_uris: postLogout.length
      ? postLogout
      : [...new Set(redirectUris.map((u) => `${new URL(u).origin}/`))],
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    token_endpoint_auth_method: process.env.OP_TOKEN_AUTH || 'client_secret_basic',
    application_type: 'web',
  });
}

// Extra client metadata: per-client token lifetimes for expiry tests.
const TTL_METADATA = {
  x_access_token_ttl: 'AccessToken',
  x_id_token_ttl: 'IdToken',
  x_refresh_token_ttl: 'RefreshToken',
};

function clientTtl(kind) {
  const key = Object.keys(TTL_METADATA).find((k) => TTL_METADATA[k] === kind);
  return (ctx, token, client) => {
    const c = client || ctx?.oidc?.client;
    const own = c ? c.metadata()[key] : undefined;
    return own || TTL[kind];
  };
}

const esc = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

function htmlPage(title, body) {
  return `<!doctype html><html><head><meta charset="utf-8"><title>${esc(title)}</title></head>`
    + `<body><h1>${esc(title)}</h1>${body}</body></html>`;
}

const configuration = {
  clients: staticClients,
  // oidc-provider refuses outgoing requests to loopback addresses (SSRF protection); the
  // back-channel logout URIs of this loopback-only test OP are all on 127.0.0.1.
  fetch: (url, options) => {
    const { dispatcher, ...rest } = options;
    return globalThis.fetch(url, rest);
  },
  clientDefaults: {
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
    id_token_signed_response_alg: 'RS256',
  },
  extraClientMetadata: {
    properties: Object.keys(TTL_METADATA),
    validator(ctx, key, value) {
      if (value === undefined || value === null) return;
      if (!Number.isInteger(value) || value <= 0) {
        throw new errors.InvalidClientMetadata(`${key} must be a positive integer`);
      }
    },
  },
  async findAccount(ctx, id) {
    const account = Object.hasOwn(ACCOUNTS, id) ? ACCOUNTS[id] : undefined;
    if (!account) return undefined;
    return { accountId: id, async claims() { return { ...account.claims }; } };
  },
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name', 'preferred_username'],
    groups: ['groups'],
  },
  scopes: ['openid', 'offline_access', 'email', 'profile', 'groups'],
  // Scope claims in the ID token as well as in userinfo, so a relying party can
  // read identity from either.
  conformIdTokenClaims: false,
  // PKCE (S256) is allowed for everyone, required only for public clients.
  pkce: { required: (ctx, client) => client.clientAuthMethod === 'none' },
  // Always issue a refresh token to clients allowed the refresh_token grant
  // (without asking for offline_access and prompt=consent).
  issueRefreshToken: async (ctx, client) => client.grantTypeAllowed('refresh_token'),
  rotateRefreshToken: ROTATE === 'always' ? true : ROTATE === 'never' ? false : undefined,
  features: {
    devInteractions: { enabled: false },
    // Loopback-only test OP: open registration, no initial access token.
    registration: { enabled: true, initialAccessToken: false },
    revocation: { enabled: true },
    // Back-Channel Logout 1.0: a client registered with backchannel_logout_uri gets a
    // logout_token POSTed when the user's session here ends (RP-initiated logout).
    backchannelLogout: { enabled: true },
    introspection: { enabled: true },
    userinfo: { enabled: true },
    // API access tokens (the gateway's routes[].bearer): a client registered with the
    // client_credentials grant gets a token for the resource it names (RFC 8707), and any
    // token requested with `resource=` is a JWT (RFC 9068) whose aud is that resource.
    // Without `resource` nothing changes: opaque tokens for userinfo, as before.
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: async (ctx, client, oneOf) => oneOf,
      useGrantedResource: async () => false,
      async getResourceServerInfo(ctx, resourceIndicator) {
        if (!/^(https?|urn):/.test(resourceIndicator)) throw new errors.InvalidTarget();
        return {
          scope: 'api:read api:write',
          audience: resourceIndicator,
          // urn:opaque:* resources get opaque tokens, for introspection (RFC 7662) tests.
          accessTokenFormat: resourceIndicator.startsWith('urn:opaque:') ? 'opaque' : 'jwt',
          jwt: { sign: { alg: 'RS256' } },
        };
      },
    },
    rpInitiatedLogout: {
      enabled: true,
      // A plain form a program can submit: the "yes" button sits inside the form.
      async logoutSource(ctx, form) {
        const button = '<button type="submit" name="logout" value="yes">Yes, sign me out</button>';
        ctx.type = 'html';
        ctx.body = htmlPage('Sign out', form.replace('</form>', `${button}</form>`));
      },
      async postLogoutSuccessSource(ctx) {
        ctx.type = 'html';
        ctx.body = htmlPage('Signed out', '<p>You are signed out of the test provider.</p>');
      },
    },
  },
  async renderError(ctx, out) {
    ctx.type = 'html';
    ctx.body = htmlPage('Provider error', Object.entries(out)
      .map(([k, v]) => `<p><b>${esc(k)}</b>: <span class="${esc(k)}">${esc(v)}</span></p>`)
      .join(''));
  },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  cookies: { keys: [randomBytes(32).toString('base64url')] },
  jwks: (() => {
    const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
    const kid = `k-${randomBytes(4).toString('hex')}`;
    return { keys: [{ ...privateKey.export({ format: 'jwk' }), kid, use: 'sig', alg: 'RS256' }] };
  })(),
  ttl: {
    AccessToken: clientTtl('AccessToken'),
    IdToken: clientTtl('IdToken'),
    RefreshToken: clientTtl('RefreshToken'),
    AuthorizationCode: TTL.AuthorizationCode,
    Interaction: 600,
    Grant: 86400,
    Session: TTL.Session,
    ClientCredentials: 600,
  },
};
if (configuration.rotateRefreshToken === undefined) delete configuration.rotateRefreshToken;

const provider = new Provider(ISSUER, configuration);

function page(res, status, title, body) {
  const html = htmlPage(title, body);
  res.writeHead(status, {
    'content-type': 'text/html; charset=utf-8',
    'cache-control': 'no-store',
    'content-length': Buffer.byteLength(html),
  });
  res.end(html);
}

function readForm(req, limit = 16 * 1024) {
  return new Promise((resolve, reject) => {
    let body = '';
    req.setEncoding('utf8');
    req.on('data', (chunk) => {
      body += chunk;
      if (body.length > limit) reject(new Error('form too large'));
    });
    req.on('end', () => resolve(new URLSearchParams(body)));
    req.on('error', reject);
  });
}

async function grantConsent(details) {
  const { prompt, params, session } = details;
  let { grantId } = details;
  const grant = grantId
    ? await provider.Grant.find(grantId)
    : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
  const d = prompt.details || {};
  if (d.missingOIDCScope) grant.addOIDCScope(d.missingOIDCScope.join(' '));
  if (d.missingOIDCClaims) grant.addOIDCClaims(d.missingOIDCClaims);
  if (d.missingResourceScopes) {
    for (const [indicator, scopes] of Object.entries(d.missingResourceScopes)) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
  }
  grantId = await grant.save();
  return details.grantId ? {} : { grantId };
}

// /interaction/:uid            GET: the login or consent form
// /interaction/:uid/login      POST: login, password
// /interaction/:uid/confirm    POST: grant consent
async function interaction(req, res, parts) {
  const [uid, action] = parts;
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid) return page(res, 400, 'Interaction mismatch', '');
  const { prompt, params } = details;

  if (req.method === 'GET' && !action) {
    if (AUTO) {
      if (prompt.name === 'login') {
        return provider.interactionFinished(req, res, { login: { accountId: 'alice' } }, { mergeWithLastSubmission: false });
      }
      return provider.interactionFinished(req, res, { consent: await grantConsent(details) }, { mergeWithLastSubmission: true });
    }
    if (prompt.name === 'login') {
      return page(res, 200, 'Sign in', `<form method="post" action="/interaction/${esc(uid)}/login">`
        + '<label>Username <input name="login" autocomplete="username" autofocus></label>'
        + '<label>Password <input name="password" type="password" autocomplete="current-password"></label>'
        + '<button type="submit">Sign in</button></form>');
    }
    return page(res, 200, 'Authorize', `<p>Client <b>${esc(params.client_id)}</b> asks for: ${esc(params.scope || '')}</p>`
      + `<form method="post" action="/interaction/${esc(uid)}/confirm">`
      + '<button type="submit">Continue</button></form>');
  }

  if (req.method === 'POST' && action === 'login' && prompt.name === 'login') {
    const form = await readForm(req);
    const login = form.get('login') || '';
    const account = Object.hasOwn(ACCOUNTS, login) ? ACCOUNTS[login] : null;
    if (!account || account.password !== (form.get('password') || '')) {
      return page(res, 401, 'Sign in failed', '<p>Unknown user or wrong password.</p>'
        + `<p><a href="/interaction/${esc(uid)}">Try again</a></p>`);
    }
    return provider.interactionFinished(req, res, { login: { accountId: login } }, { mergeWithLastSubmission: false });
  }

  if (req.method === 'POST' && action === 'confirm' && prompt.name === 'consent') {
    await readForm(req);
    return provider.interactionFinished(req, res, { consent: await grantConsent(details) }, { mergeWithLastSubmission: true });
  }
  return page(res, 400, 'Unexpected interaction step', `<p>${esc(prompt.name)} / ${esc(action || '')}</p>`);
}

// Token endpoint calls by grant_type, for tests that count refreshes: GET /_test/counts.
const tokenCalls = {};
provider.use(async (ctx, next) => {
  await next();
  if (ctx.method === 'POST' && ctx.path === '/token') {
    const grant = (ctx.oidc && ctx.oidc.params && ctx.oidc.params.grant_type) || 'unknown';
    tokenCalls[grant] = (tokenCalls[grant] || 0) + 1;
  }
});
provider.on('backchannel.error', (ctx, err, client) => {
  console.error(JSON.stringify({ msg: 'backchannel logout failed', client: client.clientId,
    error: String(err), cause: String(err && err.cause) }));
});
const providerHandler = provider.callback();

const server = createServer(async (req, res) => {
  const url = new URL(req.url, ISSUER);
  const parts = url.pathname.split('/').filter(Boolean);
  if (parts[0] === 'interaction' && parts.length >= 2) {
    try {
      await interaction(req, res, parts.slice(1));
    } catch (err) {
      if (!res.headersSent) page(res, 400, 'Interaction error', `<p>${esc(err.message)}</p>`);
    }
    return;
  }
  if (url.pathname === '/_test/counts') {
    res.writeHead(200, { 'content-type': 'application/json', 'cache-control': 'no-store' });
    res.end(JSON.stringify({ token: tokenCalls }));
    return;
  }
  if (url.pathname === '/healthz') {
    res.writeHead(200, { 'content-type': 'text/plain' });
    res.end('ok\n');
    return;
  }
  providerHandler(req, res);
});

server.keepAliveTimeout = 65000;
server.on('error', (err) => {
  console.error(JSON.stringify({ msg: 'listen failed', error: String(err), port: PORT }));
  process.exit(1);
});
server.listen(PORT, HOST, () => {
  console.log(JSON.stringify({
    msg: 'oidc-provider listening', issuer: ISSUER, port: PORT, pid: process.pid,
    registration_endpoint: `${ISSUER}/reg`, static_clients: staticClients.map((c) => c.client_id),
    ttl: TTL, rotate_refresh: ROTATE, auto_interactions: AUTO,
  }));
});

const stop = () => {
  server.close(() => process.exit(0));
  server.closeIdleConnections();
  setTimeout(() => process.exit(0), 2000).unref();
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
