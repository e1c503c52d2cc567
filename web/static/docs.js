// The API page: Swagger UI (served from the installed fastapi-offline package) on the app's own
// OpenAPI schema. A file of its own, not an inline script: the Content-Security-Policy allows none.
"use strict";

window.ui = SwaggerUIBundle({
  url: document.getElementById("swagger-ui").dataset.specUrl,
  dom_id: "#swagger-ui",
  deepLinking: true,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
  validatorUrl: null,
  tryItOutEnabled: false,
});
