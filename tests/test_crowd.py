"""The crowd page: counts, agreement and disagreement, my correlation with the crowd."""

from __future__ import annotations

import re

from rating.auth import create_user
from rating.models import db
from rating.ratings import save_rating


def test_crowd_figures(app, admin_site, client):
    mine = {1: 5, 2: 4, 3: 3, 4: 2, 5: 1, 6: 5}
    others = {1: 5, 2: 4, 3: 3, 4: 1, 5: 1, 6: 2}
    with app.app_context():
        bob = create_user("bob", "long enough")
        carol = create_user("carol", "long enough")
        for image_id, stars in mine.items():
            save_rating(1, image_id, stars)
            save_rating(bob.id, image_id, others[image_id])
            save_rating(carol.id, image_id, others[image_id] if image_id != 1 else 1)
        db.session.commit()
    html = client.get("/crowd").get_data(as_text=True)
    stats = dict((label, int(n)) for n, label in re.findall(r"<b>(\d+)</b><span>([a-z ]+)<", html))
    assert stats == {"images in the pool": 12, "raters": 3, "ratings": 18, "pairwise picks": 0}
    rho = float(re.search(r'id="agreement">(-?[\d.]+)<', html).group(1))
    assert 0.3 < rho < 1.0
    agreed, disputed = html.split("Most disagreement")
    # image 3 got 3 stars from all three: the most agreed; image 1 (5, 5, 1) the most disputed
    assert agreed.index("±0.00") < agreed.index("</table>")
    assert "±1.89" in disputed.split("</tr>")[1]


def test_agreement_needs_enough_shared_images(admin_site, client):
    assert "Rate at least 5 images" in client.get("/crowd").get_data(as_text=True)
